#include "common/base/heap_tuning.h"

#include <malloc.h>

namespace lychee {

void KeepFreedMemoryInHeap() {
  // Setting it also stops glibc from raising the threshold by itself.
  mallopt(M_MMAP_THRESHOLD, 1 << 30);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  mallopt(M_TOP_PAD, 256 << 20);
}

}  // namespace lychee
