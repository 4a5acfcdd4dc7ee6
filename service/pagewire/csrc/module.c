/*
 * The module: uffd primitives (create, register, poison, copy), the workload-side
 * memory primitives that release the GIL, constants, and module init.
 */
#include "uffd.h"

/* ---- module functions -------------------------------------------------- */

static int open_uffd(int flags)
{
    int fd = (int)syscall(SYS_userfaultfd, flags);
    if (fd >= 0)
        return fd;
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0)
        return -1;
    fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
    close(dev);
    return fd;
}

static PyObject *mod_uffd_create(PyObject *m, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"features", "nonblock", NULL};
    unsigned long long features;
    int nonblock = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "K|p", kwlist, &features, &nonblock))
        return NULL;
    int fd = open_uffd(O_CLOEXEC | (nonblock ? O_NONBLOCK : 0));
    if (fd < 0)
        return PyErr_Format(UffdError, "userfaultfd unavailable: %s", strerror(errno));
    struct uffdio_api api = {.api = UFFD_API, .features = features};
    if (ioctl(fd, UFFDIO_API, &api) < 0) {
        int err = errno;
        close(fd);
        return PyErr_Format(UffdError, "UFFDIO_API features 0x%llx refused: %s", features,
                            strerror(err));
    }
    return PyLong_FromLong(fd);
}

static PyObject *mod_uffd_features(PyObject *m, PyObject *arg)
{
    int fd = PyLong_AsLong(arg);
    if (fd < 0 && PyErr_Occurred())
        return NULL;
    return PyLong_FromUnsignedLongLong(read_fdinfo_features(fd));
}

static PyObject *mod_uffd_register(PyObject *m, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"fd", "addr", "size", "wp", "missing", NULL};
    int fd, wp = 0, missing = 1;
    unsigned long long addr, size;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iKK|pp", kwlist, &fd, &addr, &size, &wp,
                                     &missing))
        return NULL;
    struct uffdio_register reg = {.range = {addr, size},
                                  .mode = (missing ? UFFDIO_REGISTER_MODE_MISSING : 0) |
                                          (wp ? UFFDIO_REGISTER_MODE_WP : 0)};
    if (ioctl(fd, UFFDIO_REGISTER, &reg) < 0)
        return PyErr_Format(UffdError, "UFFDIO_REGISTER: %s", strerror(errno));
    Py_RETURN_NONE;
}

static PyObject *mod_uffd_unregister(PyObject *m, PyObject *args)
{
    int fd;
    unsigned long long addr, size;
    if (!PyArg_ParseTuple(args, "iKK", &fd, &addr, &size))
        return NULL;
    struct uffdio_range rg = {addr, size};
    if (ioctl(fd, UFFDIO_UNREGISTER, &rg) < 0)
        return PyErr_Format(UffdError, "UFFDIO_UNREGISTER: %s", strerror(errno));
    Py_RETURN_NONE;
}

static PyObject *mod_uffd_poison(PyObject *m, PyObject *args)
{
    int fd;
    unsigned long long addr, size, page = (unsigned long long)sysconf(_SC_PAGESIZE);
    if (!PyArg_ParseTuple(args, "iKK|K", &fd, &addr, &size, &page))
        return NULL;
    if (page == 0 || (page & (page - 1)))
        return PyErr_Format(PyExc_ValueError, "page size must be a power of two");
    int64_t n;
    Py_BEGIN_ALLOW_THREADS n = poison_range(fd, addr, size, page);
    Py_END_ALLOW_THREADS if (n < 0) return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLongLong(n);
}

static PyObject *mod_uffd_copy(PyObject *m, PyObject *args)
{
    int fd, rc;
    unsigned long long addr;
    Py_buffer b;
    if (!PyArg_ParseTuple(args, "iKy*", &fd, &addr, &b))
        return NULL;
    struct uffdio_copy c = {.dst = addr, .src = (uint64_t)(uintptr_t)b.buf, .len = (uint64_t)b.len};
    Py_BEGIN_ALLOW_THREADS rc = ioctl(fd, UFFDIO_COPY, &c);
    Py_END_ALLOW_THREADS PyBuffer_Release(&b);
    if (rc < 0 && c.copy <= 0)
        return PyErr_Format(UffdError, "UFFDIO_COPY: %s", strerror(errno));
    return PyLong_FromLongLong(c.copy);
}

/* Read another process's memory (process_vm_readv), GIL released. */
static PyObject *mod_process_read(PyObject *m, PyObject *args)
{
    int pid;
    unsigned long long addr, size;
    if (!PyArg_ParseTuple(args, "iKK", &pid, &addr, &size))
        return NULL;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)size);
    if (!out)
        return NULL;
    char *dst = PyBytes_AS_STRING(out);
    uint64_t got = 0;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS while (got < size)
    {
        struct iovec local = {dst + got, size - got};
        struct iovec remote = {(void *)(uintptr_t)(addr + got), size - got};
        ssize_t n = process_vm_readv(pid, &local, 1, &remote, 1, 0);
        if (n <= 0) {
            err = n < 0 ? errno : EFAULT;
            break;
        }
        got += (uint64_t)n;
    }
    Py_END_ALLOW_THREADS if (err)
    {
        Py_DECREF(out);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return out;
}

static PyObject *mod_pidfd_getfd(PyObject *m, PyObject *args)
{
    int pidfd, fd;
    if (!PyArg_ParseTuple(args, "ii", &pidfd, &fd))
        return NULL;
    int got = (int)syscall(SYS_pidfd_getfd, pidfd, fd, 0);
    if (got < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(got);
}

static PyObject *mod_mmap_anon(PyObject *m, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"size", "hugetlb", "addr", NULL};
    unsigned long long size, addr = 0;
    int huge = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "K|pK", kwlist, &size, &huge, &addr))
        return NULL;
    int flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE;
    if (huge)
        flags |= MAP_HUGETLB | MAP_HUGE_2MB;
    if (addr)
        flags |= MAP_FIXED_NOREPLACE; /* the same address as on the source, or an error */
    void *p = mmap((void *)(uintptr_t)addr, size, PROT_READ | PROT_WRITE, flags, -1, 0);
    if (p == MAP_FAILED)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromUnsignedLongLong((uintptr_t)p);
}

static PyObject *mod_munmap(PyObject *m, PyObject *args)
{
    unsigned long long addr, size;
    if (!PyArg_ParseTuple(args, "KK", &addr, &size))
        return NULL;
    if (munmap((void *)(uintptr_t)addr, size) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *mod_madvise(PyObject *m, PyObject *args)
{
    unsigned long long addr, size;
    int advice, rc;
    if (!PyArg_ParseTuple(args, "KKi", &addr, &size, &advice))
        return NULL;
    Py_BEGIN_ALLOW_THREADS rc = madvise((void *)(uintptr_t)addr, size, advice);
    Py_END_ALLOW_THREADS if (rc < 0) return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *mod_read_memory(PyObject *m, PyObject *args)
{
    unsigned long long addr, size;
    if (!PyArg_ParseTuple(args, "KK", &addr, &size))
        return NULL;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)size);
    if (!out)
        return NULL;
    char *dst = PyBytes_AS_STRING(out);
    Py_BEGIN_ALLOW_THREADS memcpy(dst, (void *)(uintptr_t)addr, size);
    Py_END_ALLOW_THREADS return out;
}

static PyObject *mod_write_memory(PyObject *m, PyObject *args)
{
    unsigned long long addr;
    Py_buffer b;
    if (!PyArg_ParseTuple(args, "Ky*", &addr, &b))
        return NULL;
    Py_BEGIN_ALLOW_THREADS memcpy((void *)(uintptr_t)addr, b.buf, (size_t)b.len);
    Py_END_ALLOW_THREADS PyBuffer_Release(&b);
    Py_RETURN_NONE;
}

static PyObject *mod_touch_pages(PyObject *m, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"addr", "page_size", "pages", "write", NULL};
    unsigned long long addr, ps;
    PyObject *pages;
    int write_ = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "KKO|p", kwlist, &addr, &ps, &pages, &write_))
        return NULL;
    PyObject *fast = PySequence_Fast(pages, "pages must be a sequence");
    if (!fast)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    uint64_t *idx = malloc((size_t)(n ? n : 1) * sizeof(uint64_t) * 2);
    if (!idx) {
        Py_DECREF(fast);
        return PyErr_NoMemory();
    }
    uint64_t *lat = idx + n;
    for (Py_ssize_t i = 0; i < n; i++)
        idx[i] = PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(fast, i));
    Py_DECREF(fast);
    if (PyErr_Occurred()) {
        free(idx);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS for (Py_ssize_t i = 0; i < n; i++)
    {
        volatile uint8_t *p = (volatile uint8_t *)(uintptr_t)(addr + idx[i] * ps);
        uint64_t t0 = now_ns();
        if (write_)
            *p = *p;
        else
            (void)*p;
        lat[i] = now_ns() - t0;
    }
    Py_END_ALLOW_THREADS PyObject *out = PyList_New(n);
    for (Py_ssize_t i = 0; out && i < n; i++)
        PyList_SET_ITEM(out, i, PyLong_FromUnsignedLongLong(lat[i]));
    free(idx);
    return out;
}

static int is_zero(const uint8_t *p, size_t n)
{
    const uint64_t *q = (const uint64_t *)p;
    for (size_t i = 0; i < n / 8; i++)
        if (q[i])
            return 0;
    return 1;
}

static PyObject *mod_zero_map(PyObject *m, PyObject *args)
{
    int fd;
    unsigned long long size, ps;
    if (!PyArg_ParseTuple(args, "iKK", &fd, &size, &ps))
        return NULL;
    if (ps == 0 || ps % 8 || size % ps)
        return PyErr_Format(PyExc_ValueError, "size must be a multiple of the page size");
    uint64_t npages = size / ps;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)npages);
    if (!out)
        return NULL;
    uint8_t *z = (uint8_t *)PyBytes_AS_STRING(out);
    size_t bufsz = 1 << 20;
    if (bufsz < ps)
        bufsz = ps;
    uint8_t *buf = malloc(bufsz);
    int err = 0;
    Py_BEGIN_ALLOW_THREADS memset(z, 1, npages);
    uint64_t off = 0;
    while (off < size && !err) {
        off_t data = lseek(fd, (off_t)off, SEEK_DATA);
        if (data < 0) {
            if (errno != ENXIO)
                err = errno;
            break; /* the rest is a hole */
        }
        off_t hole = lseek(fd, data, SEEK_HOLE);
        if (hole < 0 || (uint64_t)hole > size)
            hole = (off_t)size;
        uint64_t start = (uint64_t)data / ps * ps;
        for (uint64_t pos = start; pos < (uint64_t)hole && !err;) {
            size_t len = bufsz;
            if (pos + len > size)
                len = size - pos;
            ssize_t got = pread(fd, buf, len, (off_t)pos);
            if (got <= 0) {
                err = got < 0 ? errno : EIO;
                break;
            }
            for (size_t k = 0; k + ps <= (size_t)got; k += ps)
                z[(pos + k) / ps] = (uint8_t)is_zero(buf + k, ps);
            pos += (uint64_t)got / ps * ps;
        }
        off = ((uint64_t)hole + ps - 1) / ps * ps;
    }
    Py_END_ALLOW_THREADS free(buf);
    if (err) {
        Py_DECREF(out);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return out;
}

static PyObject *mod_memory_equals_file(PyObject *m, PyObject *args)
{
    unsigned long long addr, size, off;
    int fd;
    if (!PyArg_ParseTuple(args, "KKiK", &addr, &size, &fd, &off))
        return NULL;
    size_t bufsz = 1 << 20;
    uint8_t *buf = malloc(bufsz);
    long long diff = -1;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS for (uint64_t pos = 0; pos < size && diff < 0;)
    {
        size_t len = size - pos < bufsz ? size - pos : bufsz;
        ssize_t got = pread(fd, buf, len, (off_t)(off + pos));
        if (got <= 0) {
            err = got < 0 ? errno : EIO;
            break;
        }
        const uint8_t *mem = (const uint8_t *)(uintptr_t)(addr + pos);
        if (memcmp(mem, buf, (size_t)got) != 0)
            for (ssize_t k = 0; k < got; k++)
                if (mem[k] != buf[k]) {
                    diff = (long long)(pos + (uint64_t)k);
                    break;
                }
        pos += (uint64_t)got;
    }
    Py_END_ALLOW_THREADS free(buf);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLongLong(diff);
}

static PyObject *mod_sha256(PyObject *m, PyObject *arg)
{
    Py_buffer b;
    uint8_t d[32];
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS sha256(b.buf, (size_t)b.len, d);
    Py_END_ALLOW_THREADS PyBuffer_Release(&b);
    return PyBytes_FromStringAndSize((const char *)d, 32);
}

static PyObject *mod_xxh128(PyObject *m, PyObject *arg)
{
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    uint8_t out[16];
    Py_BEGIN_ALLOW_THREADS fast_digest(b.buf, (size_t)b.len, out);
    Py_END_ALLOW_THREADS PyBuffer_Release(&b);
    return PyBytes_FromStringAndSize((const char *)out, 16);
}

static PyObject *mod_zstd_compress(PyObject *m, PyObject *args)
{
    Py_buffer b;
    int level = 1;
    if (!PyArg_ParseTuple(args, "y*|i", &b, &level))
        return NULL;
    if (!zstd_compress_fn) {
        PyBuffer_Release(&b);
        return PyErr_Format(PyExc_RuntimeError, "libzstd is not available");
    }
    size_t cap = (size_t)b.len + (size_t)b.len / 128 + 1024;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)cap);
    size_t n = 0;
    if (out) {
        char *dst = PyBytes_AS_STRING(out);
        Py_BEGIN_ALLOW_THREADS n = zstd_compress_fn(dst, cap, b.buf, (size_t)b.len, level);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&b);
    if (out && (zstd_is_error_fn(n) || _PyBytes_Resize(&out, (Py_ssize_t)n) < 0)) {
        Py_XDECREF(out);
        return PyErr_Format(PyExc_ValueError, "zstd compression failed");
    }
    return out;
}

static PyObject *mod_zstd_decompress(PyObject *m, PyObject *args)
{
    Py_buffer b;
    Py_ssize_t size;
    if (!PyArg_ParseTuple(args, "y*n", &b, &size))
        return NULL;
    if (!zstd_compress_fn || size < 0 || size > (1 << 30)) {
        PyBuffer_Release(&b);
        return PyErr_Format(PyExc_ValueError, "cannot decompress (libzstd missing or bad size)");
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, size);
    int64_t n = -1;
    if (out) {
        uint8_t *dst = (uint8_t *)PyBytes_AS_STRING(out);
        Py_BEGIN_ALLOW_THREADS n = zstd_unpack(dst, (size_t)size, b.buf, (size_t)b.len);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&b);
    if (out && n != size) {
        Py_DECREF(out);
        return PyErr_Format(PyExc_ValueError, "corrupt zstd data or wrong size");
    }
    return out;
}

static PyObject *mod_zstd_available(PyObject *m, PyObject *unused)
{
    return PyBool_FromLong(zstd_compress_fn != NULL);
}

static PyMethodDef module_methods[] = {
    {"zstd_compress", mod_zstd_compress, METH_VARARGS, "zstd-compress bytes (GIL released)."},
    {"zstd_decompress", mod_zstd_decompress, METH_VARARGS,
     "zstd-decompress to exactly size bytes (GIL released)."},
    {"zstd_available", mod_zstd_available, METH_NOARGS, "Whether libzstd could be loaded."},
    {"sha256", mod_sha256, METH_O, "SHA-256 as the native channel computes it."},
    {"xxh128", mod_xxh128, METH_O, "XXH3-128 (canonical bytes): the per-chunk fast digest."},
    {"uffd_create", (PyCFunction)(void (*)(void))mod_uffd_create, METH_VARARGS | METH_KEYWORDS,
     "Create a userfaultfd with the given features."},
    {"uffd_features", mod_uffd_features, METH_O, "Negotiated features of a uffd (fdinfo)."},
    {"uffd_register", (PyCFunction)(void (*)(void))mod_uffd_register,
     METH_VARARGS | METH_KEYWORDS, "Register a range in MISSING (and WP) mode."},
    {"uffd_unregister", mod_uffd_unregister, METH_VARARGS, "Unregister a range."},
    {"uffd_poison", mod_uffd_poison, METH_VARARGS,
     "UFFDIO_POISON a range page by page, skipping present pages; pages poisoned."},
    {"pidfd_getfd", mod_pidfd_getfd, METH_VARARGS, "Copy another process's fd (pidfd_getfd)."},
    {"process_read", mod_process_read, METH_VARARGS,
     "Read another process's memory (process_vm_readv)."},
    {"uffd_copy", mod_uffd_copy, METH_VARARGS, "UFFDIO_COPY bytes to an address; bytes copied."},
    {"mmap_anon", (PyCFunction)(void (*)(void))mod_mmap_anon, METH_VARARGS | METH_KEYWORDS,
     "Map an anonymous private region; returns its address."},
    {"munmap", mod_munmap, METH_VARARGS, "Unmap."},
    {"madvise", mod_madvise, METH_VARARGS, "madvise (GIL released)."},
    {"read_memory", mod_read_memory, METH_VARARGS, "Copy memory out (GIL released)."},
    {"write_memory", mod_write_memory, METH_VARARGS, "Copy bytes in (GIL released)."},
    {"stage_chunks", (PyCFunction)(void (*)(void))mod_stage_chunks,
     METH_VARARGS | METH_KEYWORDS,
     "Fetch chunks over the native channel's stage connection before attach: (indexes, "
     "data: one zero-padded chunk_size slot each, error or None, bytes off the wire)."},
    {"touch_pages", (PyCFunction)(void (*)(void))mod_touch_pages, METH_VARARGS | METH_KEYWORDS,
     "Touch pages in order; ns per touch (GIL released)."},
    {"zero_map", mod_zero_map, METH_VARARGS, "One byte per page: 1 if all zero."},
    {"memory_equals_file", mod_memory_equals_file, METH_VARARGS,
     "-1 if memory equals the file range, else the first differing offset."},
    {NULL, NULL, 0, NULL}};

#ifdef PAGEWIRE_TEST_HOOKS
#define MODULE_NAME "_uffd_hooks" /* the test build: tests/native_hooks.py */
#define MODULE_INIT PyInit__uffd_hooks
#else
#define MODULE_NAME "pagewire._uffd"
#define MODULE_INIT PyInit__uffd
#endif
static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, MODULE_NAME,
                                       "pagewire's native userfaultfd engine.", -1,
                                       module_methods, NULL, NULL, NULL, NULL};

static uint64_t probe_features(void)
{
    int fd = open_uffd(O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        return 0;
    struct uffdio_api api = {.api = UFFD_API, .features = 0};
    uint64_t f = ioctl(fd, UFFDIO_API, &api) == 0 ? api.features : 0;
    close(fd);
    return f;
}

PyMODINIT_FUNC MODULE_INIT(void)
{
    if (PyType_Ready(&EngineType) < 0 || PyType_Ready(&DataServerType) < 0 ||
        PyType_Ready(&ChunkCacheType) < 0 || PyType_Ready(&SnapshotType) < 0)
        return NULL;
    load_libzstd();
    PyObject *m = PyModule_Create(&moduledef);
    if (!m)
        return NULL;
    UffdError = PyErr_NewExceptionWithDoc("pagewire._uffd.UffdError",
                                          "A userfaultfd operation failed.", PyExc_OSError, NULL);
    Py_INCREF(&EngineType);
    Py_INCREF(&DataServerType);
    Py_INCREF(&ChunkCacheType);
    Py_INCREF(&SnapshotType);
    if (PyModule_AddObject(m, "Snapshot", (PyObject *)&SnapshotType) < 0)
        return NULL;
    if (PyModule_AddObject(m, "DataServer", (PyObject *)&DataServerType) < 0 ||
        PyModule_AddObject(m, "ChunkCache", (PyObject *)&ChunkCacheType) < 0)
        return NULL;
    if (!UffdError || PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0 ||
        PyModule_AddObject(m, "UffdError", UffdError) < 0)
        return NULL;
    struct {
        const char *name;
        long long value;
    } consts[] = {
        {"MISSING", ST_MISSING},
        {"REQUESTED", ST_REQUESTED},
        {"PRESENT", ST_PRESENT},
        {"CACHE_ABSENT", CACHE_ABSENT},
        {"CACHE_READY", CACHE_READY},
        {"CACHE_PENDING", CACHE_PENDING},
        {"ZERO", ST_ZERO},
        {"REMOVED", ST_REMOVED},
        {"SRC_ZERO", SRC_ZERO},
        {"FAULT", KIND_FAULT},
        {"PREFETCH", KIND_PREFETCH},
        {"BACKGROUND", KIND_BACKGROUND},
        {"RES_LOCAL", RES_LOCAL},
        {"RES_REMOTE", RES_REMOTE},
        {"RES_ZERO", RES_ZERO},
        {"HIST_BUCKETS", HIST_BUCKETS},
        {"FEATURE_EVENT_FORK", UFFD_FEATURE_EVENT_FORK},
        {"FEATURE_EVENT_REMAP", UFFD_FEATURE_EVENT_REMAP},
        {"FEATURE_EVENT_REMOVE", UFFD_FEATURE_EVENT_REMOVE},
        {"FEATURE_MISSING_HUGETLBFS", UFFD_FEATURE_MISSING_HUGETLBFS},
        {"FEATURE_MISSING_SHMEM", UFFD_FEATURE_MISSING_SHMEM},
        {"FEATURE_EVENT_UNMAP", UFFD_FEATURE_EVENT_UNMAP},
        {"FEATURE_SIGBUS", UFFD_FEATURE_SIGBUS},
        {"FEATURE_THREAD_ID", UFFD_FEATURE_THREAD_ID},
        {"FEATURE_EXACT_ADDRESS", UFFD_FEATURE_EXACT_ADDRESS},
        {"FEATURE_POISON", UFFD_FEATURE_POISON},
        {"FEATURE_WP", UFFD_FEATURE_PAGEFAULT_FLAG_WP},
        {"FEATURE_WP_UNPOPULATED", UFFD_FEATURE_WP_UNPOPULATED},
    };
    for (size_t i = 0; i < sizeof consts / sizeof consts[0]; i++)
        if (PyModule_AddIntConstant(m, consts[i].name, consts[i].value) < 0)
            return NULL;
    PyObject *bounds = PyTuple_New(HIST_BUCKETS);
    for (int i = 0; bounds && i < HIST_BUCKETS; i++)
        PyTuple_SET_ITEM(bounds, i, PyLong_FromUnsignedLongLong(hist_upper(i)));
    if (!bounds || PyModule_AddObject(m, "HIST_BOUNDS_NS", bounds) < 0)
        return NULL;
    if (PyModule_AddObject(m, "API_FEATURES_SUPPORTED",
                           PyLong_FromUnsignedLongLong(probe_features())) < 0)
        return NULL;
    return m;
}
