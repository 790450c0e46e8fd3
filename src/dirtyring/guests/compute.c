/* Compute workload with verifiable progress: a hash chain h(i+1) = splitmix64(h(i) ^ i),
 * h(0) = seed. The chain state lives in the status block, so a checkpoint or snapshot carries
 * it and a restored guest continues from the committed step. Every report_every steps it
 * publishes (i, h) and does out PORT_REPORT; the VMM recomputes the chain to verify. */
#include "guest.h"

void guest_main(u64 idx)
{
    volatile struct control *c = control();
    volatile struct status *s = status(idx);
    u64 every = c->report_every ? c->report_every : 1000000UL;

    if (s->step == 0)
        s->hash = c->seed;
    for (;;) {
        u64 i = s->step;
        u64 h = splitmix64(s->hash ^ i);
        s->hash = h;
        s->step = i + 1;
        s->progress = i + 1;
        if ((i + 1) % every == 0) {
            s->report_i = i + 1;
            s->report_h = h;
            outl(PORT_REPORT, (u32)idx);
        }
        if (c->stop)
            done(0);
    }
}
