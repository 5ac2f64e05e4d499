// Prints, in hex, every code point that this machine's PCRE2 puts in the Unicode property given
// as argv[1] (e.g. "L" or "Nd"); unicode_categories.js compares that with Oniguruma's view.
// Build: cc -O2 pcre2_category_members.c -lpcre2-8 -o pcre2_category_members
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <stdio.h>

int main(int argc, char** argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s PROPERTY\n", argv[0]);
    return 2;
  }
  char pattern[64];
  snprintf(pattern, sizeof(pattern), "\\p{%s}", argv[1]);
  int error;
  PCRE2_SIZE offset;
  pcre2_code* code = pcre2_compile((PCRE2_SPTR)pattern, PCRE2_ZERO_TERMINATED,
                                   PCRE2_UTF | PCRE2_UCP, &error, &offset, NULL);
  if (code == NULL) return 1;
  pcre2_match_data* match_data = pcre2_match_data_create(1, NULL);
  for (unsigned code_point = 0; code_point <= 0x10FFFF; ++code_point) {
    if (code_point >= 0xD800 && code_point <= 0xDFFF) continue;
    unsigned char utf8[4];
    int length;
    if (code_point < 0x80) {
      utf8[0] = code_point;
      length = 1;
    } else if (code_point < 0x800) {
      utf8[0] = 0xC0 | (code_point >> 6);
      utf8[1] = 0x80 | (code_point & 0x3F);
      length = 2;
    } else if (code_point < 0x10000) {
      utf8[0] = 0xE0 | (code_point >> 12);
      utf8[1] = 0x80 | ((code_point >> 6) & 0x3F);
      utf8[2] = 0x80 | (code_point & 0x3F);
      length = 3;
    } else {
      utf8[0] = 0xF0 | (code_point >> 18);
      utf8[1] = 0x80 | ((code_point >> 12) & 0x3F);
      utf8[2] = 0x80 | ((code_point >> 6) & 0x3F);
      utf8[3] = 0x80 | (code_point & 0x3F);
      length = 4;
    }
    if (pcre2_match(code, utf8, length, 0, PCRE2_ANCHORED | PCRE2_ENDANCHORED, match_data, NULL) >= 0) {
      printf("%x\n", code_point);
    }
  }
  return 0;
}
