/* Key-value store served through a paravirtual request/response device: the VMM puts requests
 * into a ring in shared memory and the guest asks for them with `in PORT_KV_WAIT` (the doorbell;
 * the VMM may block there while idle). The guest answers into the response ring and rings
 * PORT_KV_DONE. The table is an open-addressing hash table in the data slots, so it is part of
 * every checkpoint. Key 0 is reserved (empty slot). */
#include "guest.h"

struct slot { u64 key; u64 value; };

void guest_main(u64 idx)
{
    volatile struct control *c = control();
    volatile struct status *s = status(idx);
    volatile struct kv_header *q = (volatile struct kv_header *)QUEUE_GPA;
    volatile struct kv_entry *req = (volatile struct kv_entry *)KV_REQ_GPA;
    volatile struct kv_entry *resp = (volatile struct kv_entry *)KV_RESP_GPA;
    volatile struct slot *table = (volatile struct slot *)c->data_gpa;
    u64 cap = 1;

    if (idx != 0)
        done(0);   /* one request ring, one server: other vCPUs have nothing to do */

    while (cap * 2 <= c->data_pages * 4096UL / sizeof(struct slot))
        cap *= 2;
    for (;;) {
        u64 prod = q->req_prod;
        if (q->req_cons == prod) {
            if (c->stop)
                done(0);
            prod = inl(PORT_KV_WAIT);   /* doorbell: VMM returns the producer index */
            if (c->stop)
                done(0);
            prod = q->req_prod;
        }
        u64 rp = q->resp_prod;
        while (q->req_cons != prod) {
            volatile struct kv_entry *r = &req[q->req_cons % KV_RING];
            volatile struct kv_entry *o = &resp[rp % KV_RING];
            u64 key = r->key, h = splitmix64(key) & (cap - 1), n;
            u32 st = KV_NOT_FOUND;
            u64 val = 0;
            o->id = r->id;
            o->key = key;
            if (key == 0 || (r->op_or_status != KV_PUT && r->op_or_status != KV_GET)) {
                st = KV_BAD_OP;
            } else {
                for (n = 0; n < cap; n++, h = (h + 1) & (cap - 1)) {
                    if (table[h].key == key) {
                        if (r->op_or_status == KV_PUT)
                            table[h].value = r->value;
                        val = table[h].value;
                        st = KV_OK;
                        break;
                    }
                    if (table[h].key == 0) {
                        if (r->op_or_status == KV_PUT) {
                            table[h].value = r->value;
                            table[h].key = key;
                            val = r->value;
                            st = KV_OK;
                        }
                        break;
                    }
                }
                if (n == cap && r->op_or_status == KV_PUT)
                    st = KV_FULL;
            }
            o->value = val;
            o->op_or_status = st;
            barrier();
            q->req_cons = q->req_cons + 1;
            rp++;
            s->progress = s->progress + 1;
        }
        barrier();
        q->resp_prod = rp;
        outl(PORT_KV_DONE, (u32)rp);
    }
}
