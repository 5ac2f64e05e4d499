// UTF-8 encoding and decoding of single code points, shared by the tokenizer and the chat templates.
// Free of LibTorch.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace lychee {

// Length of the sequence that `lead` starts, or 0 for a byte that cannot start one.
size_t Utf8SequenceLength(unsigned char lead);
// The code point starting at text[pos], and its length in bytes. Only for valid UTF-8.
char32_t DecodeUtf8At(std::string_view text, size_t pos, size_t* length);
void AppendUtf8(char32_t code_point, std::string* out);

}  // namespace lychee
