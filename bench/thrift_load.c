/* thrift_load: the load driver of bench/thrift_run.py.
 *
 *     thrift_load HOST PORT CONNECTIONS DEPTH SECONDS PAYLOAD_BYTES [WARMUP_SECONDS]
 *
 * Opens CONNECTIONS TCP connections and keeps DEPTH calls in flight on each (pipelined):
 * every call is the same prebuilt framed, strict-binary `echo(1: binary data)` CALL with
 * PAYLOAD_BYTES of data, only the seqid changes (1, 2, 3, ... per connection). As each reply
 * arrives a new call is queued; the calls queued while handling one read go out in one write.
 *
 * Every reply must come back in order and be byte for byte the expected REPLY: message type
 * 2, name `echo`, the seqid of the oldest call in flight on that connection, result struct
 * {0: the same data}. Latency per call is send (the write that carried it) to receipt (the
 * read that completed it), CLOCK_MONOTONIC, in 1 us buckets up to 100 ms plus an overflow
 * bucket. The first WARMUP_SECONDS (default 1) are not counted; then SECONDS are measured:
 * calls = replies received in the window, calls_per_s = calls / the window's real length.
 *
 * Errors (all counted under "errors", and broken down):
 *   closed      the peer closed the connection, or a read/write failed (calls in flight on
 *               it are lost; the connection is not reopened)
 *   bad         a reply that is not the expected bytes (type, name, seqid, size or data);
 *               if the framing or seqid is off the connection is closed too
 *   exceptions  a reply of type EXCEPTION (a TApplicationException) for the expected seqid;
 *               its message is printed to stderr (the first few)
 *   timeouts    calls still in flight at the end that were sent more than 2 s before it
 * Prints one JSON line on stdout. Exit status: 0 if no error and at least one call completed
 * in the window, 1 otherwise, 2 on bad usage / setup failure.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BUCKETS 100000u     /* 1 us each: 0 .. 99,999 us; index BUCKETS = overflow */
#define MAX_FRAME (16u << 20)
#define STALL_NS 2000000000ull
#define SHOW_ERRORS 5

typedef struct {
    int fd, id;
    int alive;
    int want_out;
    uint32_t next_seqid;  /* seqid of the next call to send */
    uint32_t expect_seqid; /* seqid of the oldest call in flight */
    uint64_t *sent;        /* ring of DEPTH send times, oldest at head */
    int head, inflight;
    unsigned char *in;
    size_t in_off, in_len, in_cap;
    unsigned char *out;
    size_t out_off, out_len, out_cap;
    int queued_unsent; /* calls in out[] whose send time is not stamped yet */
} conn_t;

static unsigned char *call_tmpl, *reply_tmpl; /* whole frames, length prefix included */
static size_t frame_len, seqid_at;             /* same length and seqid offset for both */
static int depth;
static uint64_t hist[BUCKETS + 1];
static uint64_t calls, lat_sum_us, lat_max_us;
static uint64_t n_closed, n_bad, n_exceptions, n_timeouts, shown;
static int measuring;
static int ep;

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static uint32_t get32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void put32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, "thrift_load: out of memory\n");
        exit(2);
    }
    return p;
}

static void fail(conn_t *c, uint64_t *counter, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void fail(conn_t *c, uint64_t *counter, const char *fmt, ...) {
    (*counter)++;
    if (shown++ < SHOW_ERRORS) {
        va_list ap;
        va_start(ap, fmt);
        fprintf(stderr, "thrift_load: connection %d: ", c->id);
        vfprintf(stderr, fmt, ap);
        fputc('\n', stderr);
        va_end(ap);
    } else if (shown == SHOW_ERRORS + 1) {
        fprintf(stderr, "thrift_load: (further errors not shown)\n");
    }
}

static void close_conn(conn_t *c) {
    if (!c->alive) return;
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->alive = 0;
}

static void queue_call(conn_t *c) {
    /* out[] never holds more than DEPTH frames: sized at start */
    if (c->out_off == c->out_len) c->out_off = c->out_len = 0;
    if (c->out_len + frame_len > c->out_cap) {
        memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
        c->out_len -= c->out_off;
        c->out_off = 0;
    }
    unsigned char *p = c->out + c->out_len;
    memcpy(p, call_tmpl, frame_len);
    put32(p + seqid_at, c->next_seqid++);
    c->out_len += frame_len;
    c->inflight++;
    c->queued_unsent++;
}

/* Write what is queued; stamp the send time of the calls queued since the last write. */
static int flush_out(conn_t *c) {
    if (c->queued_unsent) {
        uint64_t t = now_ns();
        int first = c->inflight - c->queued_unsent;
        for (int k = 0; k < c->queued_unsent; k++) c->sent[(c->head + first + k) % depth] = t;
        c->queued_unsent = 0;
    }
    while (c->out_off < c->out_len) {
        ssize_t n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            fail(c, &n_closed, "write: %s", strerror(errno));
            return -1;
        }
        c->out_off += (size_t)n;
    }
    int want_out = c->out_off < c->out_len;
    if (want_out != c->want_out) {
        struct epoll_event ev = {.events = EPOLLIN | (want_out ? EPOLLOUT : 0), .data.ptr = c};
        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
        c->want_out = want_out;
    }
    return 0;
}

static void show_exception(conn_t *c, const unsigned char *m, uint32_t size) {
    /* message head, then struct {1: string message, 2: i32 type}; best effort */
    uint32_t nl = get32(m + 4);
    size_t pos = 8 + (size_t)nl + 4;
    const char *text = "";
    int tlen = 0;
    int32_t type = -1;
    while (pos + 3 <= size && m[pos] != 0) {
        unsigned char ft = m[pos];
        int fid = m[pos + 1] << 8 | m[pos + 2];
        pos += 3;
        if (ft == 11 && pos + 4 <= size) {
            uint32_t l = get32(m + pos);
            if (pos + 4 + l > size) break;
            if (fid == 1) text = (const char *)m + pos + 4, tlen = (int)(l > 300 ? 300 : l);
            pos += 4 + l;
        } else if (ft == 8 && pos + 4 <= size) {
            if (fid == 2) type = (int32_t)get32(m + pos);
            pos += 4;
        } else {
            break;
        }
    }
    fail(c, &n_exceptions, "TApplicationException type %d: %.*s", type, tlen, text);
}

/* Check every whole reply in in[]; queue a new call per reply. -1: close the connection. */
static int on_replies(conn_t *c, uint64_t t) {
    while (c->in_len - c->in_off >= 4) {
        const unsigned char *f = c->in + c->in_off;
        uint32_t size = get32(f);
        if (size > MAX_FRAME || size < 12) {
            fail(c, &n_bad, "bad frame size %u", size);
            return -1;
        }
        if (c->in_len - c->in_off - 4 < size) {
            size_t need = 4 + (size_t)size;
            if (c->in_off) {
                memmove(c->in, c->in + c->in_off, c->in_len - c->in_off);
                c->in_len -= c->in_off;
                c->in_off = 0;
            }
            if (need + 65536 > c->in_cap) {
                c->in_cap = need + 65536;
                unsigned char *p = realloc(c->in, c->in_cap);
                if (!p) {
                    fprintf(stderr, "thrift_load: out of memory\n");
                    exit(2);
                }
                c->in = p;
            }
            return 0;
        }
        const unsigned char *m = f + 4;
        if (c->inflight == 0) {
            fail(c, &n_bad, "a reply with no call in flight");
            return -1;
        }
        uint32_t ver = get32(m), nl = get32(m + 4);
        if ((ver & 0xffff0000u) != 0x80010000u || nl > size - 12) {
            fail(c, &n_bad, "reply is not strict binary (version word %08x, name length %u)", ver, nl);
            return -1;
        }
        uint32_t seqid = get32(m + 8 + nl);
        if (seqid != c->expect_seqid) {
            fail(c, &n_bad, "reply seqid %u, expected %u (type %u)", seqid, c->expect_seqid, ver & 0xff);
            return -1;
        }
        if ((ver & 0xff) == 3) {
            show_exception(c, m, size);
        } else if (size + 4 != frame_len || memcmp(f, reply_tmpl, seqid_at) != 0 ||
                   memcmp(f + seqid_at + 4, reply_tmpl + seqid_at + 4, frame_len - seqid_at - 4) != 0) {
            fail(c, &n_bad, "reply %u differs from the expected REPLY (type %u, %u bytes, expected %zu)",
                 seqid, ver & 0xff, size + 4, frame_len);
        } else if (measuring) {
            uint64_t us = (t - c->sent[c->head]) / 1000;
            hist[us < BUCKETS ? us : BUCKETS]++;
            calls++;
            lat_sum_us += us;
            if (us > lat_max_us) lat_max_us = us;
        }
        c->expect_seqid++;
        c->head = (c->head + 1) % depth;
        c->inflight--;
        c->in_off += 4 + size;
        queue_call(c);
    }
    if (c->in_off == c->in_len) c->in_off = c->in_len = 0;
    return 0;
}

static void on_event(conn_t *c, uint32_t e) {
    if (e & EPOLLOUT) {
        if (flush_out(c)) {
            close_conn(c);
            return;
        }
    }
    if (!(e & (EPOLLIN | EPOLLHUP | EPOLLERR))) return;
    if (c->in_cap - c->in_len < 65536) {
        memmove(c->in, c->in + c->in_off, c->in_len - c->in_off);
        c->in_len -= c->in_off;
        c->in_off = 0;
    }
    ssize_t n = read(c->fd, c->in + c->in_len, c->in_cap - c->in_len);
    if (n <= 0) {
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return;
        fail(c, &n_closed, n == 0 ? "closed by the peer with %d calls in flight" : "read failed with %d calls in flight",
             c->inflight);
        close_conn(c);
        return;
    }
    c->in_len += (size_t)n;
    uint64_t t = now_ns();
    if (on_replies(c, t) || flush_out(c)) close_conn(c);
}

static uint64_t percentile(double p) {
    uint64_t want = (uint64_t)(p * (double)calls);
    if ((double)want < p * (double)calls) want++; /* nearest rank: ceil(p * N) */
    if (want == 0) want = 1;
    uint64_t seen = 0;
    for (uint32_t i = 0; i <= BUCKETS; i++) {
        seen += hist[i];
        if (seen >= want) return i;
    }
    return BUCKETS;
}

static double arg_num(const char *s, const char *what, double lo, double hi) {
    char *end;
    double v = strtod(s, &end);
    if (*s == 0 || *end || v < lo || v > hi) {
        fprintf(stderr, "thrift_load: bad %s %s (expected %g .. %g)\n", what, s, lo, hi);
        exit(2);
    }
    return v;
}

int main(int argc, char **argv) {
    if (argc < 7 || argc > 8) {
        fprintf(stderr, "usage: %s HOST PORT CONNECTIONS DEPTH SECONDS PAYLOAD_BYTES [WARMUP_SECONDS]\n", argv[0]);
        return 2;
    }
    int nconn = (int)arg_num(argv[3], "CONNECTIONS", 1, 100000);
    depth = (int)arg_num(argv[4], "DEPTH", 1, 1 << 16);
    double seconds = arg_num(argv[5], "SECONDS", 0.001, 1e6);
    size_t payload = (size_t)arg_num(argv[6], "PAYLOAD_BYTES", 0, MAX_FRAME - 64);
    double warmup = argc > 7 ? arg_num(argv[7], "WARMUP_SECONDS", 0, 1e6) : 1.0;
    signal(SIGPIPE, SIG_IGN);

    /* size | 80 01 00 01 | 4 "echo" | seqid | 0b 00 01 len data | 00 */
    size_t msg_len = 4 + 4 + 4 + 4 + 3 + 4 + payload + 1;
    frame_len = 4 + msg_len;
    call_tmpl = xmalloc(frame_len);
    unsigned char *p = call_tmpl;
    put32(p, (uint32_t)msg_len), p += 4;
    put32(p, 0x80010001u), p += 4;
    put32(p, 4), p += 4;
    memcpy(p, "echo", 4), p += 4;
    seqid_at = (size_t)(p - call_tmpl);
    put32(p, 0), p += 4;
    *p++ = 11, *p++ = 0, *p++ = 1;
    put32(p, (uint32_t)payload), p += 4;
    for (size_t i = 0; i < payload; i++) *p++ = (unsigned char)('a' + i % 26); /* checkable bytes */
    *p++ = 0;
    reply_tmpl = xmalloc(frame_len);
    memcpy(reply_tmpl, call_tmpl, frame_len);
    reply_tmpl[4 + 3] = 2;                  /* REPLY */
    reply_tmpl[seqid_at + 4 + 2] = 0;       /* result field 0 */

    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *ai;
    int rc = getaddrinfo(argv[1], argv[2], &hints, &ai);
    if (rc) {
        fprintf(stderr, "thrift_load: %s:%s: %s\n", argv[1], argv[2], gai_strerror(rc));
        return 2;
    }
    ep = epoll_create1(EPOLL_CLOEXEC);
    conn_t *conns = calloc((size_t)nconn, sizeof *conns);
    if (!conns) return 2;
    int one = 1;
    for (int i = 0; i < nconn; i++) {
        conn_t *c = &conns[i];
        c->id = i;
        c->fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (c->fd < 0 || connect(c->fd, ai->ai_addr, ai->ai_addrlen)) {
            fprintf(stderr, "thrift_load: connect %s:%s: %s\n", argv[1], argv[2], strerror(errno));
            return 2;
        }
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (fcntl(c->fd, F_SETFL, O_NONBLOCK)) return 2;
        c->alive = 1;
        c->sent = xmalloc((size_t)depth * sizeof *c->sent);
        c->in_cap = 2 * frame_len + 65536;
        c->in = xmalloc(c->in_cap);
        c->out_cap = (size_t)depth * frame_len;
        c->out = xmalloc(c->out_cap);
        c->next_seqid = c->expect_seqid = 1;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
    }
    freeaddrinfo(ai);
    uint64_t t0 = now_ns();
    for (int i = 0; i < nconn; i++) {
        conn_t *c = &conns[i];
        for (int k = 0; k < depth; k++) queue_call(c);
        if (flush_out(c)) close_conn(c);
    }
    uint64_t start = t0 + (uint64_t)(warmup * 1e9), end = start + (uint64_t)(seconds * 1e9);
    uint64_t measured_from = 0, measured_to = 0;
    struct epoll_event evs[512];
    int alive = nconn;
    for (;;) {
        uint64_t t = now_ns();
        if (!measuring && t >= start) {
            measuring = 1;
            measured_from = t;
        }
        if (t >= end) break;
        uint64_t next = measuring ? end : start;
        int timeout_ms = (int)((next - t) / 1000000) + 1;
        if (timeout_ms > 100) timeout_ms = 100;
        int n = epoll_wait(ep, evs, 512, timeout_ms);
        if (n < 0 && errno != EINTR) {
            perror("thrift_load: epoll_wait");
            return 2;
        }
        for (int i = 0; i < n; i++) on_event(evs[i].data.ptr, evs[i].events);
        alive = 0;
        for (int i = 0; i < nconn; i++) alive += conns[i].alive;
        if (!alive) {
            fprintf(stderr, "thrift_load: every connection is closed; stopping early\n");
            break;
        }
    }
    measured_to = now_ns();
    for (int i = 0; i < nconn; i++) {
        conn_t *c = &conns[i];
        if (!c->alive) continue;
        for (int k = 0; k < c->inflight - c->queued_unsent; k++) {
            if (measured_to - c->sent[(c->head + k) % depth] > STALL_NS) {
                fail(c, &n_timeouts, "call %u still unanswered after %.1f s", c->expect_seqid + (uint32_t)k,
                     (double)(measured_to - c->sent[(c->head + k) % depth]) / 1e9);
            }
        }
        close_conn(c);
    }
    double elapsed = measured_from ? (double)(measured_to - measured_from) / 1e9 : 0.0;
    uint64_t errors = n_closed + n_bad + n_exceptions + n_timeouts;
    uint64_t overflow = hist[BUCKETS];
    printf("{\"calls\": %llu, \"seconds\": %.3f, \"calls_per_s\": %.1f, \"p50_us\": %llu, \"p90_us\": %llu, "
           "\"p99_us\": %llu, \"p999_us\": %llu, \"max_us\": %llu, \"mean_us\": %.1f, \"over_100ms\": %llu, "
           "\"errors\": %llu, \"closed\": %llu, \"bad\": %llu, \"exceptions\": %llu, \"timeouts\": %llu, "
           "\"connections\": %d, \"connections_alive\": %d, \"depth\": %d, \"payload_bytes\": %zu, "
           "\"frame_bytes\": %zu, \"warmup_s\": %.3f}\n",
           (unsigned long long)calls, elapsed, elapsed > 0 ? (double)calls / elapsed : 0.0,
           (unsigned long long)(calls ? percentile(0.50) : 0), (unsigned long long)(calls ? percentile(0.90) : 0),
           (unsigned long long)(calls ? percentile(0.99) : 0), (unsigned long long)(calls ? percentile(0.999) : 0),
           (unsigned long long)lat_max_us, calls ? (double)lat_sum_us / (double)calls : 0.0,
           (unsigned long long)overflow, (unsigned long long)errors, (unsigned long long)n_closed,
           (unsigned long long)n_bad, (unsigned long long)n_exceptions, (unsigned long long)n_timeouts, nconn, alive,
           depth, payload, frame_len, warmup);
    if (!calls) fprintf(stderr, "thrift_load: no call completed in the measured window\n");
    return errors || !calls ? 1 : 0;
}
