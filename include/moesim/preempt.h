/* preempt: a run that is told to stop (SLURM's SIGTERM before a kill, its
 * --signal=B:USR1@N, or Ctrl-C) stops at the next step boundary with a
 * checkpoint, instead of dying mid-step.
 *
 * The handler only records the signal; the trainer polls it once per step
 * and every rank agrees before acting. The same signal a second time takes
 * its default action at once (the handler is one-shot). */
#ifndef MOESIM_PREEMPT_H
#define MOESIM_PREEMPT_H

#ifdef __cplusplus
extern "C" {
#endif

/* Exit status of a run that stopped on a signal: EX_TEMPFAIL, "try again"
 * (resume with --load). */
#define MOESIM_EXIT_INTERRUPTED 75

/* Catches SIGTERM, SIGINT and SIGUSR1 from now on. */
void preempt_install(void);
/* The signal caught so far, or 0. */
int preempt_signal(void);
/* Stop catching (the default actions again). */
void preempt_uninstall(void);

#ifdef __cplusplus
}
#endif
#endif
