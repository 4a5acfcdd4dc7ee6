/*
 * Digests (SHA-256 from libcrypto, XXH3-128 inline), zstd loaded at run time
 * (optional: only sessions asking for compression need it), and full reads/writes.
 */
#include "uffd.h"

void sha256(const uint8_t *data, size_t len, uint8_t out[32])
{
    SHA256(data, len, out);
}

/* The per-chunk check on the hot path: XXH3-128 (libxxhash) runs near memory speed.
 * SHA-256 stays the export's identity and the cache key; see README "Integrity". */
void fast_digest(const uint8_t *data, size_t len, uint8_t out[16])
{
    XXH128_canonical_t canon;
    XXH128_canonicalFromHash(&canon, XXH3_128bits(data, len));
    memcpy(out, canon.digest, 16);
}
zstd_compress_t zstd_compress_fn;
static zstd_decompress_t zstd_decompress_fn;
zstd_is_error_t zstd_is_error_fn;

void load_libzstd(void)
{
    void *h = dlopen("libzstd.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!h)
        return;
    zstd_compress_fn = (zstd_compress_t)dlsym(h, "ZSTD_compress");
    zstd_decompress_fn = (zstd_decompress_t)dlsym(h, "ZSTD_decompress");
    zstd_is_error_fn = (zstd_is_error_t)dlsym(h, "ZSTD_isError");
    if (!zstd_compress_fn || !zstd_decompress_fn || !zstd_is_error_fn)
        zstd_compress_fn = NULL;
}

int64_t zstd_pack(uint8_t *dst, size_t cap, const uint8_t *src, size_t len)
{
    size_t n = zstd_compress_fn(dst, cap, src, len, 1);
    return zstd_is_error_fn(n) ? -1 : (int64_t)n;
}

int64_t zstd_unpack(uint8_t *dst, size_t cap, const uint8_t *src, size_t len)
{
    size_t n = zstd_decompress_fn(dst, cap, src, len);
    return zstd_is_error_fn(n) ? -1 : (int64_t)n;
}

int read_full(int fd, void *buf, size_t len)
{
    uint8_t *p = buf;
    while (len) {
        ssize_t n = read(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

int write_full(int fd, const void *buf, size_t len)
{
    return send_full(fd, buf, len, 0);
}

/* flags: MSG_MORE when more follows at once (a header before its data: one segment). */
int send_full(int fd, const void *buf, size_t len, int flags)
{
    const uint8_t *p = buf;
    while (len) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL | flags);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}
