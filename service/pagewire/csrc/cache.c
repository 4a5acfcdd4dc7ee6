/*
 * The per-host chunk cache: verified chunks keyed by SHA-256, shared by a host's
 * sessions, LRU-bounded, with claims so concurrent sessions fetch each chunk once.
 */
#include "uffd.h"

static unsigned cache_bucket(const uint8_t d[32])
{
    uint32_t h;
    memcpy(&h, d, 4);
    return h % CACHE_BUCKETS;
}

static centry_t *cache_find(ChunkCache *c, const uint8_t d[32])
{
    for (centry_t *x = c->buckets[cache_bucket(d)]; x; x = x->next_in_bucket)
        if (memcmp(x->digest, d, 32) == 0)
            return x;
    return NULL;
}

static void lru_unlink(ChunkCache *c, centry_t *x)
{
    if (x->lru_prev)
        x->lru_prev->lru_next = x->lru_next;
    else if (c->lru_head == x)
        c->lru_head = x->lru_next;
    if (x->lru_next)
        x->lru_next->lru_prev = x->lru_prev;
    else if (c->lru_tail == x)
        c->lru_tail = x->lru_prev;
    x->lru_prev = x->lru_next = NULL;
}

static void lru_push(ChunkCache *c, centry_t *x)
{
    x->lru_prev = NULL;
    x->lru_next = c->lru_head;
    if (c->lru_head)
        c->lru_head->lru_prev = x;
    c->lru_head = x;
    if (!c->lru_tail)
        c->lru_tail = x;
}

static void cache_drop(ChunkCache *c, centry_t *x)
{
    centry_t **pp = &c->buckets[cache_bucket(x->digest)];
    while (*pp && *pp != x)
        pp = &(*pp)->next_in_bucket;
    if (*pp)
        *pp = x->next_in_bucket;
    lru_unlink(c, x);
    c->bytes -= x->len;
    c->entries--;
    free(x->data);
    free(x);
}

static void cache_evict(ChunkCache *c)
{
    centry_t *x = c->lru_tail;
    while (x && c->bytes > c->capacity) {
        centry_t *prev = x->lru_prev;
        if (!x->pending) {
            cache_drop(c, x);
            c->evictions++;
        }
        x = prev;
    }
}

/* A verified copy of the chunk into dst: CACHE_READY on a hit; a corrupt entry is
 * dropped and counts as a miss. Claims an absent entry for owner if claim is set. */
int cache_take(ChunkCache *c, const uint8_t d[32], uint8_t *dst, uint32_t len,
               const void *owner, int claim)
{
    if (!c)
        return CACHE_ABSENT;
    pthread_mutex_lock(&c->lock);
    centry_t *x = cache_find(c, d);
    int result = CACHE_ABSENT;
    uint8_t want[16];
    if (x && x->pending) {
        result = x->owner == owner ? CACHE_ABSENT : CACHE_PENDING;
    } else if (x && x->len == len) {
        memcpy(dst, x->data, len);
        memcpy(want, x->fast, 16);
        lru_unlink(c, x);
        lru_push(c, x);
        result = CACHE_READY;
    }
    pthread_mutex_unlock(&c->lock);
    if (result == CACHE_READY) {
        uint8_t check[16];
        fast_digest(dst, len, check);
        if (memcmp(check, want, 16) != 0) {
            pthread_mutex_lock(&c->lock);
            if ((x = cache_find(c, d)) && !x->pending)
                cache_drop(c, x);
            c->corrupt++;
            pthread_mutex_unlock(&c->lock);
            result = CACHE_ABSENT;
        }
    }
    pthread_mutex_lock(&c->lock);
    if (result == CACHE_READY)
        c->hits++;
    else if (result == CACHE_ABSENT) {
        c->misses++;
        if (claim && !cache_find(c, d) && c->capacity >= len) {
            centry_t *n = calloc(1, sizeof *n);
            if (n) {
                memcpy(n->digest, d, 32);
                n->pending = 1;
                n->owner = owner;
                n->next_in_bucket = c->buckets[cache_bucket(d)];
                c->buckets[cache_bucket(d)] = n;
                c->entries++;
            }
        }
    }
    pthread_mutex_unlock(&c->lock);
    return result;
}

/* A claim whose chunk will not come after all (its data did not match the key). */
static void cache_refuse(ChunkCache *c, const uint8_t d[32])
{
    pthread_mutex_lock(&c->lock);
    centry_t *x = cache_find(c, d);
    if (x && x->pending) {
        centry_t **pp = &c->buckets[cache_bucket(d)];
        while (*pp && *pp != x)
            pp = &(*pp)->next_in_bucket;
        if (*pp)
            *pp = x->next_in_bucket;
        c->entries--;
        free(x);
    }
    c->corrupt++;
    pthread_mutex_unlock(&c->lock);
}

/* Keep a chunk (fulfilling a claim, or adding it) if its SHA-256 is its key. */
void cache_fill(ChunkCache *c, const uint8_t d[32], const uint8_t *data, uint32_t len)
{
    if (!c || c->capacity < len)
        return;
    uint8_t check[32];
    sha256(data, len, check);
    if (memcmp(check, d, 32) != 0) {
        cache_refuse(c, d);
        return;
    }
    uint8_t *copy = malloc(len ? len : 1);
    if (!copy)
        return;
    memcpy(copy, data, len);
    uint8_t fast[16];
    fast_digest(copy, len, fast);
    pthread_mutex_lock(&c->lock);
    centry_t *x = cache_find(c, d);
    if (!x) {
        x = calloc(1, sizeof *x);
        if (!x) {
            pthread_mutex_unlock(&c->lock);
            free(copy);
            return;
        }
        memcpy(x->digest, d, 32);
        x->next_in_bucket = c->buckets[cache_bucket(d)];
        c->buckets[cache_bucket(d)] = x;
        c->entries++;
    } else if (!x->pending) {
        pthread_mutex_unlock(&c->lock);
        free(copy);
        return;
    } else {
        lru_unlink(c, x);
    }
    x->data = copy;
    memcpy(x->fast, fast, 16);
    x->len = len;
    x->pending = 0;
    x->owner = NULL;
    c->bytes += len;
    c->fills++;
    lru_push(c, x);
    cache_evict(c);
    pthread_mutex_unlock(&c->lock);
}

/* A failed fetcher gives its claims back, so others fetch those chunks themselves. */
void cache_release(ChunkCache *c, const void *owner)
{
    if (!c)
        return;
    pthread_mutex_lock(&c->lock);
    for (int b = 0; b < CACHE_BUCKETS; b++) {
        centry_t **pp = &c->buckets[b];
        while (*pp) {
            centry_t *x = *pp;
            if (x->pending && x->owner == owner) {
                *pp = x->next_in_bucket;
                c->entries--;
                free(x);
            } else {
                pp = &x->next_in_bucket;
            }
        }
    }
    pthread_mutex_unlock(&c->lock);
}

static void cache_clear_locked(ChunkCache *c)
{
    for (int b = 0; b < CACHE_BUCKETS; b++) {
        centry_t **pp = &c->buckets[b];
        while (*pp) {
            centry_t *x = *pp;
            if (x->pending) {
                pp = &x->next_in_bucket;
                continue;
            }
            *pp = x->next_in_bucket;
            lru_unlink(c, x);
            c->bytes -= x->len;
            c->entries--;
            free(x->data);
            free(x);
        }
    }
}

static int ChunkCache_init(ChunkCache *c, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"capacity", NULL};
    unsigned long long cap;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "K", kwlist, &cap))
        return -1;
    if (c->capacity == 0 && c->entries == 0)
        pthread_mutex_init(&c->lock, NULL);
    c->capacity = cap;
    return 0;
}

static void ChunkCache_dealloc(ChunkCache *c)
{
    cache_clear_locked(c);
    cache_release(c, NULL);
    for (int b = 0; b < CACHE_BUCKETS; b++) /* claims of engines long gone */
        while (c->buckets[b]) {
            centry_t *x = c->buckets[b];
            c->buckets[b] = x->next_in_bucket;
            free(x->data);
            free(x);
        }
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static PyObject *ChunkCache_get(ChunkCache *c, PyObject *args)
{
    Py_buffer d;
    unsigned int len;
    if (!PyArg_ParseTuple(args, "y*I", &d, &len))
        return NULL;
    if (d.len != 32) {
        PyBuffer_Release(&d);
        return PyErr_Format(PyExc_ValueError, "digests are 32 bytes");
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, len);
    int r = CACHE_ABSENT;
    if (out) {
        uint8_t *dst = (uint8_t *)PyBytes_AS_STRING(out);
        Py_BEGIN_ALLOW_THREADS r = cache_take(c, d.buf, dst, len, NULL, 0);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&d);
    if (out && r != CACHE_READY) {
        Py_DECREF(out);
        Py_RETURN_NONE;
    }
    return out;
}

/* claim(digest, length, owner) -> (state, data): READY with a verified copy, PENDING
 * (another owner fetches it), or ABSENT (now claimed by owner, a nonzero int). */
static PyObject *ChunkCache_claim(ChunkCache *c, PyObject *args)
{
    Py_buffer d;
    unsigned int len;
    unsigned long long owner;
    if (!PyArg_ParseTuple(args, "y*IK", &d, &len, &owner))
        return NULL;
    if (d.len != 32 || owner == 0) {
        PyBuffer_Release(&d);
        return PyErr_Format(PyExc_ValueError, "a 32-byte digest and a nonzero owner");
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, len);
    int r = CACHE_ABSENT;
    if (out) {
        uint8_t *dst = (uint8_t *)PyBytes_AS_STRING(out);
        const void *who = (const void *)(uintptr_t)owner;
        Py_BEGIN_ALLOW_THREADS r = cache_take(c, d.buf, dst, len, who, 1);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&d);
    if (!out)
        return NULL;
    if (r != CACHE_READY) {
        Py_DECREF(out);
        return Py_BuildValue("(iO)", r, Py_None);
    }
    return Py_BuildValue("(iN)", r, out);
}

static PyObject *ChunkCache_release(ChunkCache *c, PyObject *arg)
{
    unsigned long long owner = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred())
        return NULL;
    cache_release(c, (const void *)(uintptr_t)owner);
    Py_RETURN_NONE;
}

static PyObject *ChunkCache_put(ChunkCache *c, PyObject *args)
{
    Py_buffer d, data;
    if (!PyArg_ParseTuple(args, "y*y*", &d, &data))
        return NULL;
    if (d.len == 32) {
        Py_BEGIN_ALLOW_THREADS cache_fill(c, d.buf, data.buf, (uint32_t)data.len);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&d);
    PyBuffer_Release(&data);
    Py_RETURN_NONE;
}

static PyObject *ChunkCache_clear(ChunkCache *c, PyObject *unused)
{
    pthread_mutex_lock(&c->lock);
    cache_clear_locked(c);
    pthread_mutex_unlock(&c->lock);
    Py_RETURN_NONE;
}

#ifdef PAGEWIRE_TEST_HOOKS
/* Test hook: flip one byte of a cached chunk, to prove hits are verified. */
static PyObject *ChunkCache_corrupt(ChunkCache *c, PyObject *arg)
{
    Py_buffer d;
    if (PyObject_GetBuffer(arg, &d, PyBUF_SIMPLE) < 0)
        return NULL;
    pthread_mutex_lock(&c->lock);
    centry_t *x = d.len == 32 ? cache_find(c, d.buf) : NULL;
    int done = x && !x->pending && x->len > 0;
    if (done)
        x->data[0] ^= 0xFF;
    pthread_mutex_unlock(&c->lock);
    PyBuffer_Release(&d);
    return PyBool_FromLong(done);
}
#endif

static PyObject *ChunkCache_stats(ChunkCache *c, PyObject *unused)
{
    pthread_mutex_lock(&c->lock);
    PyObject *d = Py_BuildValue(
        "{sKsKsKsKsKsKsKsK}", "capacity", (unsigned long long)c->capacity, "bytes",
        (unsigned long long)c->bytes, "entries", (unsigned long long)c->entries, "hits",
        (unsigned long long)c->hits, "misses", (unsigned long long)c->misses, "evictions",
        (unsigned long long)c->evictions, "corrupt", (unsigned long long)c->corrupt, "fills",
        (unsigned long long)c->fills);
    pthread_mutex_unlock(&c->lock);
    return d;
}

static PyMethodDef ChunkCache_methods[] = {
    {"get", (PyCFunction)ChunkCache_get, METH_VARARGS, "get(digest, length) -> bytes or None"},
    {"put", (PyCFunction)ChunkCache_put, METH_VARARGS, "put(digest, verified chunk)"},
    {"claim", (PyCFunction)ChunkCache_claim, METH_VARARGS,
     "claim(digest, length, owner) -> (state, data or None)"},
    {"release", (PyCFunction)ChunkCache_release, METH_O, "Give back an owner's claims."},
    {"clear", (PyCFunction)ChunkCache_clear, METH_NOARGS, "Drop every ready entry."},
#ifdef PAGEWIRE_TEST_HOOKS
    {"corrupt", (PyCFunction)ChunkCache_corrupt, METH_O, "Test hook: damage one entry."},
#endif
    {"stats", (PyCFunction)ChunkCache_stats, METH_NOARGS, "Counters."},
    {NULL, NULL, 0, NULL}};

PyTypeObject ChunkCacheType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "pagewire._uffd.ChunkCache",
    .tp_basicsize = sizeof(ChunkCache),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Verified chunks by digest, shared by the sessions of a host.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)ChunkCache_init,
    .tp_dealloc = (destructor)ChunkCache_dealloc,
    .tp_methods = ChunkCache_methods,
};
const char *state_names[] = {"created", "running", "completed", "failed"};

PyObject *UffdError;

int vec_push(vec_t *v, const void *item)
{
    if (v->len == v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 64;
        void *n = realloc(v->items, cap * v->item_size);
        if (!n)
            return -1;
        v->items = n;
        v->cap = cap;
    }
    memcpy((char *)v->items + v->len * v->item_size, item, v->item_size);
    v->len++;
    return 0;
}

void signal_fd(int fd)
{
    uint64_t one = 1;
    if (fd >= 0 && write(fd, &one, sizeof one) < 0) {
        /* eventfd full cannot happen at these counts; nothing to do */
    }
}

void set_state(Engine *e, region_t *r, uint64_t p, int st)
{
    int old = r->state[p] & ST_MASK;
    if (old == st)
        return;
    if (old == ST_PRESENT)
        e->n_present--;
    else if (old == ST_ZERO)
        e->n_zero--;
    else if (old == ST_REMOVED)
        e->n_removed--;
    if (st == ST_PRESENT)
        e->n_present++;
    else if (st == ST_ZERO)
        e->n_zero++;
    else if (st == ST_REMOVED)
        e->n_removed++;
    r->state[p] = (uint8_t)((r->state[p] & ~ST_MASK) | st);
}

int page_done(uint8_t s)
{
    int st = s & ST_MASK;
    return st == ST_PRESENT || st == ST_ZERO || st == ST_REMOVED;
}

int all_done(Engine *e) { return e->n_present + e->n_zero + e->n_removed >= e->total; }

void engine_fail_locked(Engine *e, const char *code)
{
    if (e->state == E_RUNNING || e->state == E_CREATED) {
        e->state = E_FAILED;
        snprintf(e->error, sizeof e->error, "%s", code);
    }
    e->stop = 1;
}

int find_region(Engine *e, uint64_t addr)
{
    for (int i = 0; i < e->nregions; i++) {
        region_t *r = &e->regions[i];
        if (addr >= r->base && addr - r->base < r->size)
            return i;
    }
    return -1;
}
