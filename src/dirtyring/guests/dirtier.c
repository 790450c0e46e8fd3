/* Memory dirtier: writes the control page's current iteration into data pages, following a
 * pattern, so tests can check that every written page was reported dirty.
 * Each write stores (iteration, vCPU index, write count) in the first 24 bytes of the page.
 * With several vCPUs, vCPU i works on its own 1/n share of the data pages. */
#include "guest.h"

void guest_main(u64 idx)
{
    volatile struct control *c = control();
    volatile struct status *s = status(idx);
    u64 n = c->nr_vcpus ? c->nr_vcpus : 1;
    u64 share = c->data_pages / n;
    u64 base = c->data_gpa + idx * share * 4096UL;
    u64 pattern = c->pattern, hot = c->hot_pages, exit_every = c->exit_every;
    u64 stride = c->stride ? c->stride : 1;
    u64 rng = splitmix64(c->seed + idx + 1) | 1;
    u64 ticks_per_write = 0, next = 0;
    u64 pos = 0, since_tick = 0;

    if (pattern == 2 && (hot == 0 || hot > share))
        hot = share;
    if (c->rate_pps)
        ticks_per_write = c->tsc_khz * 1000UL / c->rate_pps;
    if (share == 0)
        done(1);
    next = rdtsc();
    for (;;) {
        u64 page;
        if (pattern == 1) {              /* random: xorshift64 */
            rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
            page = rng % share;
        } else if (pattern == 2) {       /* hot set: hot pages `stride` apart, in order */
            page = (pos * stride) % share;
            if (++pos == hot) { pos = 0; s->passes = s->passes + 1; }
        } else {                         /* sequential over the share, `stride` apart */
            page = (pos * stride) % share;
            if (++pos == share) { pos = 0; s->passes = s->passes + 1; }
        }
        volatile u64 *p = (volatile u64 *)(base + page * 4096UL);
        u64 count = s->progress + 1;
        p[0] = c->iteration;
        p[1] = idx;
        p[2] = count;
        s->progress = count;
        if (exit_every && ++since_tick == exit_every) {
            since_tick = 0;
            outl(PORT_TICK, (u32)idx);
        }
        u64 max_writes = c->max_writes;   /* re-read: the VMM may change it while we run */
        if (c->stop || (max_writes && count >= max_writes))
            done(0);
        if (ticks_per_write) {
            next += ticks_per_write;
            while ((long)(rdtsc() - next) < 0)
                cpu_relax();
        }
    }
}
