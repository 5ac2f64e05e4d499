// How the servers wait for SIGINT or SIGTERM: the signals are blocked in every thread (call
// BlockShutdownSignals before starting any) and taken by one sigwait, so that shutdown runs on
// the main thread instead of in whichever thread a signal happens to hit.
#pragma once

#include <pthread.h>
#include <signal.h>

namespace lychee {

inline sigset_t BlockShutdownSignals() {
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  return signals;
}

// Blocks until one of `signals` arrives; returns its number.
inline int WaitForShutdownSignal(const sigset_t& signals) {
  int signal_number = 0;
  sigwait(&signals, &signal_number);
  return signal_number;
}

}  // namespace lychee
