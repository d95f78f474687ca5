#include "moesim/preempt.h"

#include <signal.h>
#include <string.h>

/* A signal handler can reach nothing else: the one piece of global state. */
static volatile sig_atomic_t caught;

static void remember(int sig) {
    caught = sig;
}

static const int SIGNALS[] = {SIGTERM, SIGINT, SIGUSR1};

void preempt_install(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = remember;
    sa.sa_flags = SA_RESETHAND; /* a second signal: the default action, at once */
    sigemptyset(&sa.sa_mask);
    caught = 0;
    for (size_t i = 0; i < sizeof SIGNALS / sizeof SIGNALS[0]; i++)
        sigaction(SIGNALS[i], &sa, NULL);
}

int preempt_signal(void) {
    return caught;
}

void preempt_uninstall(void) {
    for (size_t i = 0; i < sizeof SIGNALS / sizeof SIGNALS[0]; i++) signal(SIGNALS[i], SIG_DFL);
}
