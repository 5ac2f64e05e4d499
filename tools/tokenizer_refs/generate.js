#!/usr/bin/env node
// Writes tests/data/tokenizers/expected.json: what Hugging Face `tokenizers` (the Rust core, through
// its Node binding) makes of every text of texts.json with every tokenizer of tokenizers.json.
// See README.md next to this file for how to run it.
'use strict';

const fs = require('fs');
const path = require('path');
const zlib = require('zlib');
const { Tokenizer } = require('tokenizers');
const tokenizersVersion = require('tokenizers/package.json').version;

const root = path.resolve(__dirname, '..', '..');
const dataDir = path.join(root, 'tests', 'data', 'tokenizers');

function readJson(relativePath) {
  let bytes = fs.readFileSync(path.join(root, relativePath));
  if (relativePath.endsWith('.gz')) bytes = zlib.gunzipSync(bytes);
  return JSON.parse(bytes.toString('utf8'));
}

// RFC 7386 JSON merge patch (what nlohmann::json::merge_patch does on the C++ side).
function mergePatch(target, patch) {
  if (patch === null || typeof patch !== 'object' || Array.isArray(patch)) return patch;
  if (target === null || typeof target !== 'object' || Array.isArray(target)) target = {};
  for (const [key, value] of Object.entries(patch)) {
    if (value === null) {
      delete target[key];
    } else {
      target[key] = mergePatch(target[key], value);
    }
  }
  return target;
}

async function main() {
  const { texts, long_texts: longTexts } = readJson('tests/data/tokenizers/texts.json');
  const { tokenizers: definitions } = readJson('tests/data/tokenizers/tokenizers.json');
  const lines = [];
  lines.push('{');
  lines.push(` "generated_by": ${JSON.stringify(`tokenizers ${tokenizersVersion} (Hugging Face, Node binding) via tools/tokenizer_refs/generate.js`)},`);
  lines.push(' "tokenizers": [');
  for (const [index, definition] of definitions.entries()) {
    let config = readJson(definition.file);
    if (definition.patch) config = mergePatch(config, definition.patch);
    const tokenizer = Tokenizer.fromString(JSON.stringify(config));
    // `tokenizers` assigns added-token ids itself; a definition whose ids disagree would test
    // something other than what it says.
    for (const added of config.added_tokens || []) {
      const id = tokenizer.tokenToId(added.content);
      if (id !== added.id) {
        throw new Error(`${definition.name}: added token ${JSON.stringify(added.content)} gets id ${id}, not ${added.id}`);
      }
    }
    const header = { name: definition.name, file: definition.file };
    if (definition.patch) header.patch = definition.patch;
    lines.push(`  {${JSON.stringify(header).slice(1, -1)}, "cases": [`);
    const caseTexts = definition.long_texts ? texts.concat(longTexts) : texts;
    for (const [caseIndex, text] of caseTexts.entries()) {
      const plain = await tokenizer.encode(text, null, { addSpecialTokens: false });
      const withSpecial = await tokenizer.encode(text, null, { addSpecialTokens: true });
      const ids = plain.getIds();
      const idsWithSpecialTokens = withSpecial.getIds();
      const decoded = await tokenizer.decode(ids, false);
      const decodedSkipping = await tokenizer.decode(ids, true);
      // To keep the file small, a field equal to the one it defaults to is left out:
      // ids_with_special_tokens defaults to ids, decoded to text, and
      // decoded_skipping_special_tokens to decoded.
      const entry = { text, ids };
      if (JSON.stringify(idsWithSpecialTokens) !== JSON.stringify(ids)) {
        entry.ids_with_special_tokens = idsWithSpecialTokens;
      }
      if (decoded !== text) entry.decoded = decoded;
      if (decodedSkipping !== decoded) entry.decoded_skipping_special_tokens = decodedSkipping;
      lines.push(`   ${JSON.stringify(entry)}${caseIndex + 1 < caseTexts.length ? ',' : ''}`);
    }
    lines.push(`  ]}${index + 1 < definitions.length ? ',' : ''}`);
  }
  lines.push(' ]');
  lines.push('}');
  fs.writeFileSync(path.join(dataDir, 'expected.json'), lines.join('\n') + '\n');
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
