/*
 * Huge pages over the native channel. A page larger than a chunk can only be installed
 * whole, so a fault asks for every chunk of its page at once, and chunks (from the urgent
 * connection, a bulk connection or the host's cache) are gathered per page until the
 * last one lands; then the page goes in with one UFFDIO_COPY.
 */
#include "uffd.h"

/* How many chunks make one page of the regions (1: pages no larger than a chunk, nothing
 * to gather); -1 when the channel cannot carry them: regions with different page sizes
 * (a gather would span pages of another size, or none), a page not on a page boundary of
 * the image, or a page of more than MAX_UNIT chunks (1 GiB pages: gRPC brings them). */
int chan_unit_chunks(Engine *e, uint64_t chunk_size)
{
    uint64_t ps = e->nregions ? e->regions[0].page_size : 0;
    int mixed = 0;
    for (int i = 0; i < e->nregions; i++) {
        region_t *r = &e->regions[i];
        if (r->page_size > chunk_size && r->offset % r->page_size)
            return -1;
        mixed |= r->page_size != ps;
        ps = r->page_size > ps ? r->page_size : ps;
    }
    if (ps <= chunk_size)
        return 1;
    return mixed || ps % chunk_size || ps / chunk_size > MAX_UNIT ? -1 : (int)(ps / chunk_size);
}

int chan_gather_init(struct chan *c, uint64_t unit)
{
    c->unit = unit;
    if (unit <= 1)
        return 0;
    uint64_t nunits = (c->nchunks + unit - 1) / unit;
    c->gather = calloc(nunits + 1, sizeof *c->gather);
    c->gather_n = calloc(nunits + 1, sizeof *c->gather_n);
    c->gather_retries = calloc(nunits + 1, 1);
    c->gathered = calloc(c->nchunks + 1, 1);
    return c->gather && c->gather_n && c->gather_retries && c->gathered ? 0 : -1;
}

void chan_gather_free(struct chan *c)
{
    for (uint64_t u = 0; c->gather && u * c->unit < c->nchunks; u++)
        free(c->gather[u]);
    free(c->gather);
    free(c->gather_n);
    free(c->gather_retries);
    free(c->gathered);
}

/* Forget page u's gathered chunks and give back its buffer. */
static void gather_drop(struct chan *c, uint64_t u)
{
    uint64_t first = u * c->unit, last = first + c->unit;
    free(c->gather[u]);
    c->gather[u] = NULL;
    c->gather_n[u] = 0;
    memset(c->gathered + first, 0, (last < c->nchunks ? last : c->nchunks) - first);
}

/* Under the engine lock: a fault on a huge page asks for each chunk of it not yet here or
 * on its way (one asked for in bulk and close there is waited for, as for base pages;
 * deeper in the bulk queue it is asked for urgently and the source skips it there unless
 * already sent). Returns 1 if the channel brings the page. */
int chan_request_unit_locked(Engine *e, struct chan *c, uint64_t chunk)
{
    uint64_t first = chunk - chunk % c->unit;
    uint64_t last = first + c->unit < c->nchunks ? first + c->unit : c->nchunks;
    uint32_t n = 0, waiting = 0, full = 0;
    for (uint64_t k = first; k < last; k++) /* the whole page is the touch: replay it whole */
        record_offset(e, k * c->chunk_size);
    for (uint64_t k = first; k < last; k++) {
        /* gathered: the page goes in when the rest lands, or is going in now (an install
         * that waits for a REMOVE in flight lets go of the lock) */
        if (c->gathered[k] || c->asked[k] == ASK_URGENT ||
            (c->asked[k] == ASK_BULK && chan_wait_on_bulk_locked(c, k))) {
            waiting = 1;
            continue;
        }
        if (c->nout >= CHAN_MAX_REQ) {
            full = 1; /* Python takes this page; what is in the outbox is still answered */
            break;
        }
        c->outbox[c->nout++] = k;
        c->asked[k] = ASK_URGENT;
        n++;
    }
    if (n && c->outstanding == 0)
        c->last_answer_ns = now_ns();
    c->outstanding += n;
    c->chunks_waited += waiting && !n;
    return !full && (waiting || n);
}

/* Under the engine lock: keep chunk k until its page is whole, then install the page.
 * A chunk whose page is no longer needed (installed, removed) or that is here already
 * (urgent and bulk both sent it) is dropped. */
void chan_gather_locked(Engine *e, uint64_t k, const uint8_t *data, int kind)
{
    struct chan *c = e->chan;
    uint64_t u = k / c->unit, first = u * c->unit;
    uint64_t last = first + c->unit < c->nchunks ? first + c->unit : c->nchunks;
    c->asked[k] = ASK_NONE;
    if (c->gathered[k])
        return;
    if (!chunk_holds(e, c, k, 1u << ST_MISSING | 1u << ST_REQUESTED)) {
        if (c->gather[u]) /* the page went in another way, or was removed: drop the rest */
            gather_drop(c, u);
        return;
    }
    if (!c->gather[u] && !(c->gather[u] = malloc(c->unit * c->chunk_size))) {
        chan_down_locked(e, "out of memory gathering a huge page");
        return;
    }
    memcpy(c->gather[u] + (k - first) * c->chunk_size, data, chunk_len_of(c, k));
    c->gathered[k] = 1;
    if (++c->gather_n[u] < last - first)
        return;
    uint64_t off = first * c->chunk_size, end = last * c->chunk_size;
    uint8_t *page = c->gather[u];
    /* whole: from here on no chunk of it is gathered again, whatever the install does */
    install_image_range(e, off, page, (end < c->export_size ? end : c->export_size) - off,
                        kind, 1);
    gather_drop(c, u);
    /* fell short while a fault waits: ask again, a few times (a range that keeps refusing
     * the install must not cost 2 MiB of traffic per round for ever) */
    if (e->state == E_RUNNING && c->up && c->gather_retries[u] < GATHER_RETRIES &&
        chunk_holds(e, c, first, 1u << ST_REQUESTED)) {
        c->gather_retries[u]++;
        chan_request_unit_locked(e, c, first);
        signal_fd(e->ctl_fd);
    }
}
