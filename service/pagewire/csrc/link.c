/*
 * The native data channel's byte stream: plain TCP, or TLS 1.3 through OpenSSL with the
 * agent's own certificate, key and CA (both sides verify each other, as gRPC's mTLS does).
 *
 * A TLS link's socket is non-blocking: every SSL call is made under the link's lock and
 * every wait (poll) happens outside it, so the destination's fault thread can send a
 * request while its urgent thread waits for answers on the same connection.
 */
#include "uffd.h"
#include <arpa/inet.h>
#include <fnmatch.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>

#define TLS_READ_BUFFER (256u << 10)

static void tls_error(char *err, size_t n, const char *what)
{
    unsigned long e = ERR_get_error();
    char detail[160] = "";
    if (e)
        ERR_error_string_n(e, detail, sizeof detail);
    snprintf(err, n, "%s%s%s", what, e ? ": " : "", detail);
    ERR_clear_error();
}

/* A TLS 1.3 context that presents cert (with its chain) and key, and accepts only peers
 * whose certificate chains to ca. NULL, with err set, when a file is unusable. */
SSL_CTX *tls_context(int server, const char *cert, const char *key, const char *ca, char *err,
                     size_t n)
{
    SSL_CTX *ctx = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
    if (!ctx) {
        tls_error(err, n, "cannot make a TLS context");
        return NULL;
    }
    SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
    /* AES-128-GCM first (AES-NI: the fastest here), and whole records read ahead into a
     * large buffer: fewer read() calls per chunk */
    SSL_CTX_set_ciphersuites(ctx, "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:"
                                  "TLS_CHACHA20_POLY1305_SHA256");
    SSL_CTX_set_read_ahead(ctx, 1);
    SSL_CTX_set_default_read_buffer_len(ctx, TLS_READ_BUFFER);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    SSL_CTX_set_mode(ctx, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    if (server) { /* nothing is sent after the handshake but the answers */
        SSL_CTX_set_num_tickets(ctx, 0);
        SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    }
    const char *bad = NULL;
    if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1)
        bad = "cannot load the TLS certificate";
    else if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1 ||
             SSL_CTX_check_private_key(ctx) != 1)
        bad = "cannot load the TLS key (or it does not match the certificate)";
    else if (SSL_CTX_load_verify_locations(ctx, ca, NULL) != 1)
        bad = "cannot load the TLS CA";
    if (bad) {
        tls_error(err, n, bad);
        SSL_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

void link_plain(link_t *l, int fd)
{
    memset(l, 0, sizeof *l);
    l->fd = fd;
    l->timeout_ms = -1;
}

/* Wait for fd to be ready as an SSL call asked; -1 on timeout or error. */
static int tls_wait(link_t *l, int ssl_err, int timeout_ms)
{
    struct pollfd pfd = {l->fd, ssl_err == SSL_ERROR_WANT_WRITE ? POLLOUT : POLLIN, 0};
    int rc;
    do
        rc = poll(&pfd, 1, timeout_ms);
    while (rc < 0 && errno == EINTR);
    if (rc == 0)
        errno = ETIMEDOUT;
    return rc > 0 ? 0 : -1;
}

/* The TLS handshake on a connected socket, within timeout_ms. A client checks that the
 * server's certificate names host (a DNS name or an IP address). */
int link_tls(link_t *l, SSL_CTX *ctx, int server, const char *host, int timeout_ms)
{
    l->ssl = SSL_new(ctx);
    if (!l->ssl || SSL_set_fd(l->ssl, l->fd) != 1)
        return -1;
    pthread_mutex_init(&l->lock, NULL);
    l->timeout_ms = timeout_ms;
    fcntl(l->fd, F_SETFL, fcntl(l->fd, F_GETFL) | O_NONBLOCK);
    if (!server) {
        unsigned char ip[16];
        int is_ip = inet_pton(AF_INET, host, ip) == 1 || inet_pton(AF_INET6, host, ip) == 1;
        X509_VERIFY_PARAM *param = SSL_get0_param(l->ssl);
        if (is_ip ? X509_VERIFY_PARAM_set1_ip_asc(param, host) != 1
                  : SSL_set1_host(l->ssl, host) != 1 || SSL_set_tlsext_host_name(l->ssl, host) != 1)
            return -1;
    }
    uint64_t deadline = now_ns() + (uint64_t)timeout_ms * 1000000ULL;
    for (;;) {
        ERR_clear_error();
        int rc = server ? SSL_accept(l->ssl) : SSL_connect(l->ssl);
        if (rc == 1)
            return 0;
        int e = SSL_get_error(l->ssl, rc);
        uint64_t now = now_ns();
        if ((e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) || now >= deadline ||
            tls_wait(l, e, (int)((deadline - now) / 1000000ULL) + 1) < 0)
            return -1;
    }
}

/* Why the last handshake failed, for the log line of the fallback. */
void link_tls_reason(link_t *l, char *out, size_t n)
{
    long v = l->ssl ? SSL_get_verify_result(l->ssl) : X509_V_OK;
    if (v != X509_V_OK)
        snprintf(out, n, "TLS: peer certificate refused: %s", X509_verify_cert_error_string(v));
    else
        tls_error(out, n, "TLS handshake failed");
}

/* Move len bytes through TLS: each SSL call under the lock, each wait outside it. */
static int tls_full(link_t *l, uint8_t *p, size_t len, int writing)
{
    while (len) {
        int want = len > (1u << 30) ? 1 << 30 : (int)len;
        pthread_mutex_lock(&l->lock);
        ERR_clear_error();
        int n = writing ? SSL_write(l->ssl, p, want) : SSL_read(l->ssl, p, want);
        int e = n > 0 ? SSL_ERROR_NONE : SSL_get_error(l->ssl, n);
        pthread_mutex_unlock(&l->lock);
        if (n > 0) {
            p += n;
            len -= (size_t)n;
        } else if ((e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) ||
                   tls_wait(l, e, l->timeout_ms) < 0) {
            return -1;
        }
    }
    return 0;
}

int link_read(link_t *l, void *buf, size_t len)
{
    return l->ssl ? tls_full(l, buf, len, 0) : read_full(l->fd, buf, len);
}

int link_write(link_t *l, const void *buf, size_t len)
{
    /* SSL_write does not write through its buffer argument */
    return l->ssl ? tls_full(l, (uint8_t *)(uintptr_t)buf, len, 1) : write_full(l->fd, buf, len);
}

/* 1 when a read would find data now (TLS may hold decrypted bytes the socket no longer
 * shows), 0 when nothing came within timeout_ms, -1 on error. */
int link_wait(link_t *l, int timeout_ms)
{
    if (l->ssl) {
        pthread_mutex_lock(&l->lock);
        int buffered = SSL_has_pending(l->ssl); /* decrypted, or read ahead raw */
        pthread_mutex_unlock(&l->lock);
        if (buffered)
            return 1;
    }
    struct pollfd pfd = {l->fd, POLLIN, 0};
    int rc = poll(&pfd, 1, timeout_ms);
    return rc < 0 ? (errno == EINTR ? 0 : -1) : rc > 0;
}

/* Free the TLS state; the socket stays open (its owner closes it). */
void link_release(link_t *l)
{
    if (l->ssl) {
        SSL_free(l->ssl);
        pthread_mutex_destroy(&l->lock);
        l->ssl = NULL;
    }
}

void link_close(link_t *l)
{
    link_release(l);
    if (l->fd >= 0)
        close(l->fd);
    l->fd = -1;
}

/* Does the peer's certificate carry a SAN (DNS name, IP address or URI) matching one of
 * the patterns (--peer-allow, shell-style)? No patterns: any certificate of the CA. */
int link_peer_allowed(link_t *l, char *const *patterns, int npatterns)
{
    if (npatterns == 0)
        return 1;
    X509 *cert = l->ssl ? SSL_get1_peer_certificate(l->ssl) : NULL;
    if (!cert)
        return 0;
    GENERAL_NAMES *names = X509_get_ext_d2i(cert, NID_subject_alt_name, NULL, NULL);
    int ok = 0;
    for (int i = 0; names && !ok && i < sk_GENERAL_NAME_num(names); i++) {
        GENERAL_NAME *g = sk_GENERAL_NAME_value(names, i);
        char name[256] = "";
        if (g->type == GEN_DNS || g->type == GEN_URI) {
            ASN1_STRING *s = g->type == GEN_DNS ? g->d.dNSName : g->d.uniformResourceIdentifier;
            int len = ASN1_STRING_length(s);
            if (len <= 0 || len >= (int)sizeof name)
                continue;
            memcpy(name, ASN1_STRING_get0_data(s), (size_t)len);
            if (memchr(name, 0, (size_t)len))
                continue; /* an embedded NUL: not a name anyone can match honestly */
        } else if (g->type == GEN_IPADD) {
            int len = ASN1_STRING_length(g->d.iPAddress);
            if (len != 4 && len != 16)
                continue;
            inet_ntop(len == 4 ? AF_INET : AF_INET6, ASN1_STRING_get0_data(g->d.iPAddress),
                      name, sizeof name);
        } else {
            continue;
        }
        for (int j = 0; j < npatterns && !ok; j++)
            ok = fnmatch(patterns[j], name, 0) == 0;
    }
    GENERAL_NAMES_free(names);
    X509_free(cert);
    return ok;
}
