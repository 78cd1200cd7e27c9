/* Thrift load driver: pipelined framed strict-binary echo calls, latency histogram.
 *
 *     load HOST PORT CONNECTIONS DEPTH SECONDS PAYLOAD_BYTES [WARMUP_SECONDS]
 *
 * Each connection keeps DEPTH calls in flight: a new call (a prebuilt frame
 * with the next seqid) goes out as each reply comes in. Every reply must be a
 * REPLY (type 2) with the seqid expected next on its connection (replies come
 * back in order) and the same size as the call; anything else is an error.
 * Latency is send-to-reply per call (CLOCK_MONOTONIC) in 1 us buckets up to
 * 100 ms. Prints one JSON line; exit status 1 if any call failed.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BUCKETS 100000

typedef struct {
    int fd;
    int32_t next_seqid, expect_seqid;
    uint64_t *sent;  /* send time per call in flight, a FIFO of DEPTH */
    int head, count;
    unsigned char *in;
    size_t in_len, in_cap;
    unsigned char *out;
    size_t out_len, out_cap;
} conn_t;

static unsigned char *frame;
static size_t frame_len, seqid_at;
static int depth;
static uint64_t hist[BUCKETS + 1];
static uint64_t calls, errors;
static int measuring;

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void queue_call(conn_t *c, uint64_t t) {
    if (c->out_len + frame_len > c->out_cap) {
        c->out_cap = (c->out_len + frame_len) * 2;
        c->out = realloc(c->out, c->out_cap);
    }
    unsigned char *p = c->out + c->out_len;
    memcpy(p, frame, frame_len);
    uint32_t s = htonl((uint32_t)c->next_seqid++);
    memcpy(p + seqid_at, &s, 4);
    c->out_len += frame_len;
    c->sent[(c->head + c->count) % depth] = t;
    c->count++;
}

static int flush_out(conn_t *c) {
    size_t off = 0;
    while (off < c->out_len) {
        ssize_t n = write(c->fd, c->out + off, c->out_len - off);
        if (n < 0) {
            if (errno == EAGAIN) { struct timespec ts = {0, 20000}; nanosleep(&ts, NULL); continue; }
            return -1;
        }
        off += (size_t)n;
    }
    c->out_len = 0;
    return 0;
}

static int on_replies(conn_t *c) {
    size_t pos = 0;
    uint64_t t = now_ns();
    while (c->in_len - pos >= 4) {
        uint32_t size;
        memcpy(&size, c->in + pos, 4);
        size = ntohl(size);
        if (c->in_len - pos - 4 < size) break;
        unsigned char *m = c->in + pos + 4;
        int32_t seqid;
        memcpy(&seqid, m + seqid_at - 4, 4);
        seqid = (int32_t)ntohl((uint32_t)seqid);
        if (size != frame_len - 4 || m[3] != 2 || seqid != c->expect_seqid) {
            fprintf(stderr, "bad reply: size %u type %d seqid %d (expected %d)\n", size, m[3], seqid, c->expect_seqid);
            return -1;
        }
        c->expect_seqid++;
        uint64_t us = (t - c->sent[c->head]) / 1000;
        c->head = (c->head + 1) % depth;
        c->count--;
        if (measuring) { hist[us < BUCKETS ? us : BUCKETS]++; calls++; }
        queue_call(c, t);
        pos += 4 + size;
    }
    memmove(c->in, c->in + pos, c->in_len - pos);
    c->in_len -= pos;
    return flush_out(c);
}

static uint64_t percentile(double p) {
    uint64_t want = (uint64_t)(p * (double)calls + 0.999999), seen = 0;
    if (want == 0) want = 1;
    for (int i = 0; i <= BUCKETS; i++) { seen += hist[i]; if (seen >= want) return (uint64_t)i; }
    return BUCKETS;
}

int main(int argc, char **argv) {
    if (argc < 7) { fprintf(stderr, "usage: %s HOST PORT CONNECTIONS DEPTH SECONDS PAYLOAD_BYTES [WARMUP_SECONDS]\n", argv[0]); return 2; }
    int nconn = atoi(argv[3]);
    depth = atoi(argv[4]);
    double seconds = atof(argv[5]), warmup = argc > 7 ? atof(argv[7]) : 1.0;
    size_t payload = (size_t)atol(argv[6]);
    /* echo(1: binary data), strict binary: version|type, name, seqid, field 1 string, stop. */
    const char *name = "echo";
    size_t msg_len = 4 + 4 + 4 + 4 + 3 + 4 + payload + 1;
    frame_len = 4 + msg_len;
    frame = malloc(frame_len);
    unsigned char *p = frame;
    uint32_t v = htonl((uint32_t)msg_len); memcpy(p, &v, 4); p += 4;
    v = htonl(0x80010001u); memcpy(p, &v, 4); p += 4;
    v = htonl(4); memcpy(p, &v, 4); p += 4;
    memcpy(p, name, 4); p += 4;
    seqid_at = (size_t)(p - frame); p += 4;
    *p++ = 11; *p++ = 0; *p++ = 1;
    v = htonl((uint32_t)payload); memcpy(p, &v, 4); p += 4;
    memset(p, 'x', payload); p += payload;
    *p++ = 0;

    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM}, *ai;
    if (getaddrinfo(argv[1], argv[2], &hints, &ai)) { fprintf(stderr, "cannot resolve\n"); return 2; }
    int ep = epoll_create1(0);
    conn_t *conns = calloc((size_t)nconn, sizeof *conns);
    int one = 1;
    uint64_t t0 = now_ns();
    for (int i = 0; i < nconn; i++) {
        conn_t *c = &conns[i];
        c->fd = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(c->fd, ai->ai_addr, ai->ai_addrlen)) { perror("connect"); return 1; }
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        c->sent = calloc((size_t)depth, sizeof *c->sent);
        c->in_cap = 1 << 20;
        c->in = malloc(c->in_cap);
        c->next_seqid = c->expect_seqid = 1;
        for (int k = 0; k < depth; k++) queue_call(c, t0);
        if (flush_out(c)) { perror("write"); return 1; }
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
    }
    uint64_t start = t0 + (uint64_t)(warmup * 1e9), end = start + (uint64_t)(seconds * 1e9);
    struct epoll_event evs[256];
    uint64_t measured_from = 0;
    for (;;) {
        uint64_t t = now_ns();
        if (!measuring && t >= start) { measuring = 1; measured_from = t; }
        if (t >= end) break;
        int n = epoll_wait(ep, evs, 256, 100);
        for (int i = 0; i < n; i++) {
            conn_t *c = evs[i].data.ptr;
            if (c->in_len + 65536 > c->in_cap) { c->in_cap *= 2; c->in = realloc(c->in, c->in_cap); }
            ssize_t r = read(c->fd, c->in + c->in_len, c->in_cap - c->in_len);
            if (r <= 0) { fprintf(stderr, "connection %d closed\n", (int)(c - conns)); errors++; goto done; }
            c->in_len += (size_t)r;
            if (on_replies(c)) { errors++; goto done; }
        }
    }
done:;
    double elapsed = measured_from ? (double)(now_ns() - measured_from) / 1e9 : 0.0;
    printf("{\"calls\": %llu, \"seconds\": %.3f, \"calls_per_s\": %.1f, \"p50_us\": %llu, \"p99_us\": %llu, "
           "\"errors\": %llu, \"connections\": %d, \"depth\": %d, \"payload_bytes\": %zu}\n",
           (unsigned long long)calls, elapsed, elapsed > 0 ? (double)calls / elapsed : 0.0,
           (unsigned long long)(calls ? percentile(0.50) : 0), (unsigned long long)(calls ? percentile(0.99) : 0),
           (unsigned long long)errors, nconn, depth, payload);
    return errors ? 1 : 0;
}
