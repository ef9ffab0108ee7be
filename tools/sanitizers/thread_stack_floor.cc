// Linked into every binary and test of the sanitizer builds (--config=asan /
// tsan, through --custom_malloc; it defines no allocator): raises any thread
// stack size a library requests to at least 1 MiB.
//
// Why: civetweb (prometheus-cpp's /metrics server, services/common/metrics.cc)
// starts its threads with a hard-coded 100 KiB stack. glibc carves each
// thread's static TLS out of that stack, and the sanitizer runtimes' TLS plus
// their interceptors leave too little of it: under ASan, a scrape overflowed
// the stack inside vsnprintf (glibc's printf_positional) and killed the
// process. The GPU worker builds (kl-prefill-cuda, kl-decode-cuda) link it too:
// libcublasLt's static TLS alone is larger than 100 KiB, so there civetweb
// could not start a thread at all ("null context when constructing
// CivetServer"). Other normal builds are unaffected and do not link this.
#include <dlfcn.h>
#include <pthread.h>

#include <cstddef>

extern "C" int pthread_attr_setstacksize(pthread_attr_t* attr, size_t size) noexcept {
  using Fn = int (*)(pthread_attr_t*, size_t);
  static const Fn real = reinterpret_cast<Fn>(dlsym(RTLD_NEXT, "pthread_attr_setstacksize"));
  constexpr size_t kFloor = size_t{1} << 20;
  return real(attr, size < kFloor ? kFloor : size);
}
