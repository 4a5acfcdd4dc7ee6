/*
 * Who gets the CPU first on a busy host: the threads a demand fault waits on run ahead
 * (real time, within a CPU budget), bulk fill yields on wake-up but keeps its share.
 */
#include "uffd.h"

/* Bulk work yields the CPU to demand faults when they wake up, but keeps its fair share:
 * SCHED_BATCH, not a nice level (a niced bulk thread starves on a busy host, and a fault
 * waiting for a chunk already on the bulk connection would starve with it). */
void bulk_priority(void)
{
    struct sched_param sp = {0};
    sched_setscheduler((pid_t)syscall(SYS_gettid), SCHED_BATCH, &sp);
}

/* A 100 us slice: on wake-up the thread preempts sooner (EEVDF, Linux 6.12+; older
 * kernels refuse the attribute and nothing changes). */
static void short_slice(pid_t tid)
{
    struct {
        uint32_t size, policy;
        uint64_t flags;
        int32_t nice;
        uint32_t priority;
        uint64_t runtime, deadline, period;
    } attr = {.size = 48, .policy = SCHED_OTHER, .runtime = 100000};
    syscall(SYS_sched_setattr, tid, &attr, 0);
}

static uint64_t thread_cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* The threads a demand fault waits on (the destination's fault thread and urgent receiver,
 * the source's urgent sender). With CAP_SYS_NICE: SCHED_FIFO at the lowest real-time
 * priority, so a busy host's other threads (bulk fill included) never make a fault wait
 * for a time slice; each runs in short bursts between waits, and the engine lock inherits
 * priority. Without it (or realtime 0), a short slice. Returns the budget that
 * rt_budget_check keeps. */
rt_budget_t urgent_priority(int realtime)
{
    rt_budget_t b = {.tid = (pid_t)syscall(SYS_gettid)};
    struct sched_param sp = {.sched_priority = 1};
    b.realtime =
        realtime && sched_setscheduler(b.tid, SCHED_FIFO | SCHED_RESET_ON_FORK, &sp) == 0;
    if (!b.realtime)
        short_slice(b.tid);
    b.window_ns = now_ns();
    b.cpu_ns = thread_cpu_ns();
    return b;
}

/* After each burst: a thread that used more than RT_BUDGET_PCT of a CPU over the last
 * RT_WINDOW_NS (a peer flooding requests, a workload faulting in a loop) gives up real
 * time for good and keeps only the short slice, so nobody buys priority over the host. */
void rt_budget_check(rt_budget_t *b)
{
    if (!b->realtime)
        return;
    uint64_t now = now_ns();
    if (now - b->window_ns < RT_WINDOW_NS)
        return;
    uint64_t cpu = thread_cpu_ns();
    int over = (cpu - b->cpu_ns) * 100 > (now - b->window_ns) * RT_BUDGET_PCT;
    b->window_ns = now;
    b->cpu_ns = cpu;
    if (!over)
        return;
    struct sched_param sp = {0};
    sched_setscheduler(b->tid, SCHED_OTHER, &sp);
    short_slice(b->tid);
    b->realtime = 0;
}
