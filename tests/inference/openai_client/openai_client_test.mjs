// Streams a chat completion and a completion from a lychee-inference HTTP API through the
// official openai client, and prints what came back as one JSON object for
// tests/inference/http_server_test.cc to check against the server's unstreamed answers.
// Usage: node openai_client_test.mjs BASE_URL API_KEY
import OpenAI from 'openai';

const [baseURL, apiKey] = process.argv.slice(2);
// No retries: a failure must show, not be papered over.
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0 });

// The deltas of a stream put together, its finish reason and usage, and Lychee's summary.
async function collect(stream, textOf) {
  const result = { text: '', finish_reason: null, usage: null, lychee: null, chunks: 0 };
  for await (const chunk of stream) {
    result.chunks += 1;
    if (chunk.usage) result.usage = chunk.usage;
    if (chunk.lychee) result.lychee = chunk.lychee;
    for (const choice of chunk.choices) {
      result.text += textOf(choice) ?? '';
      if (choice.finish_reason) result.finish_reason = choice.finish_reason;
    }
  }
  return result;
}

const { data: models } = await client.models.list();
const model = models[0].id;

const chat = await collect(
  await client.chat.completions.create({
    model,
    messages: [{ role: 'user', content: 'Where is the harbour?' }],
    max_tokens: 12,
    temperature: 0,
    stream: true,
    stream_options: { include_usage: true },
  }),
  (choice) => choice.delta.content,
);

const completion = await collect(
  await client.completions.create({
    model,
    prompt: 'The harbour was quiet that morning and',
    max_tokens: 12,
    temperature: 0,
    stream: true,
    stream_options: { include_usage: true },
  }),
  (choice) => choice.text,
);

// An error comes back as the client's typed error, with the status and the field named.
let error = null;
try {
  await client.completions.create({ model, prompt: 'Hello', n: 2 });
} catch (e) {
  error = { name: e.constructor.name, status: e.status, param: e.param ?? e.error?.param ?? null };
}

console.log(JSON.stringify({ model, chat, completion, error }));
