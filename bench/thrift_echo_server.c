/* thrift_echo_server: the Thrift backend of bench/thrift_run.py.
 *
 *     thrift_echo_server PORT          (PORT 0: pick one; the port is printed on stdout)
 *
 * Framed transport, strict binary protocol, on 127.0.0.1. For every frame that is a
 * CALL (type 1) of method `echo` whose args struct is exactly {1: binary data}, it
 * sends back a REPLY (type 2) with the same name and seqid whose result struct is
 * {0: binary data} with the same bytes: the frame is copied and two things change,
 * the message-type byte (1 -> 2) and the id of the first field (1 -> 0).
 *
 * A well-formed CALL of another method gets a TApplicationException (message type
 * EXCEPTION, UNKNOWN_METHOD), as a Thrift server would. Anything else (a frame over
 * 16 MiB or too short for its contents, a non-strict or unknown version, another
 * message type, args that are not exactly {1: binary}) closes the connection.
 *
 * Single thread, epoll (level-triggered), non-blocking sockets. Replies go out in
 * request order per connection; many frames in one read (pipelining) and frames
 * split over many reads are both handled. Buffers are bounded: the input holds at
 * most one maximal frame plus one read, and a connection is not read while more than
 * OUT_HIGH bytes of replies wait to be written (so a client that does not read
 * cannot make the server buffer without limit). Buffers grown for big frames are
 * shrunk back once empty.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_FRAME (16u << 20)     /* largest frame body accepted (bytes after the length) */
#define READ_MIN (64u << 10)      /* free space wanted before each read */
#define BUF_INIT (256u << 10)     /* initial / steady-state buffer size */
#define OUT_HIGH (1u << 20)       /* stop reading while this much output is pending */

#define T_CALL 1
#define T_REPLY 2
#define T_EXCEPTION 3
#define TT_STOP 0
#define TT_I32 8
#define TT_STRING 11
#define TT_STRUCT 12
#define UNKNOWN_METHOD 1

typedef struct {
    unsigned char *p;
    size_t off, len, cap; /* valid bytes are p[off .. len) */
} buf_t;

typedef struct {
    int fd;
    int want_out; /* EPOLLOUT registered */
    int reading;  /* EPOLLIN registered */
    buf_t in, out;
} conn_t;

static int ep;
static unsigned long long n_calls, n_conns, n_closed_bad;

static uint32_t get32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void put32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

/* Make room for `need` more bytes after len; compacts first. 0 or -1 (no memory). */
static int reserve(buf_t *b, size_t need) {
    if (b->off && (b->off == b->len || b->cap - b->len < need)) {
        memmove(b->p, b->p + b->off, b->len - b->off);
        b->len -= b->off;
        b->off = 0;
    }
    if (b->cap - b->len >= need) return 0;
    size_t n = b->cap ? b->cap : BUF_INIT;
    while (n - b->len < need) n *= 2;
    unsigned char *p = realloc(b->p, n);
    if (!p) return -1;
    b->p = p;
    b->cap = n;
    return 0;
}

/* After a big frame: give the memory back once the buffer is empty. */
static void shrink(buf_t *b) {
    if (b->off == b->len) {
        b->off = b->len = 0;
        if (b->cap > BUF_INIT) {
            unsigned char *p = realloc(b->p, BUF_INIT);
            if (p) {
                b->p = p;
                b->cap = BUF_INIT;
            }
        }
    }
}

static void set_events(conn_t *c) {
    int want_out = c->out.len > c->out.off;
    int reading = (c->out.len - c->out.off) < OUT_HIGH;
    if (want_out == c->want_out && reading == c->reading) return;
    struct epoll_event ev = {.events = (reading ? EPOLLIN : 0) | (want_out ? EPOLLOUT : 0), .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    c->want_out = want_out;
    c->reading = reading;
}

static void close_conn(conn_t *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->in.p);
    free(c->out.p);
    free(c);
}

/* TApplicationException(UNKNOWN_METHOD) for a CALL of another method. */
static int unknown_method(conn_t *c, const unsigned char *name, uint32_t name_len, const unsigned char *seqid) {
    static const char text[] = "unknown method (this server only has echo)";
    size_t tlen = sizeof text - 1;
    size_t body = 4 + 4 + name_len + 4 + (3 + 4 + tlen) + (3 + 4) + 1;
    if (reserve(&c->out, 4 + body)) return -1;
    unsigned char *r = c->out.p + c->out.len;
    put32(r, (uint32_t)body);
    put32(r + 4, 0x80010000u | T_EXCEPTION);
    put32(r + 8, name_len);
    memcpy(r + 12, name, name_len);
    unsigned char *q = r + 12 + name_len;
    memcpy(q, seqid, 4);
    q += 4;
    *q++ = TT_STRING, *q++ = 0, *q++ = 1;
    put32(q, (uint32_t)tlen);
    memcpy(q + 4, text, tlen);
    q += 4 + tlen;
    *q++ = TT_I32, *q++ = 0, *q++ = 2;
    put32(q, UNKNOWN_METHOD);
    q += 4;
    *q++ = TT_STOP;
    c->out.len += 4 + body;
    return 0;
}

/* Answer every whole frame in c->in. -1: malformed (or out of memory): close. */
static int answer(conn_t *c) {
    buf_t *in = &c->in;
    while (in->len - in->off >= 4) {
        const unsigned char *f = in->p + in->off;
        uint32_t size = get32(f);
        if (size > MAX_FRAME || size < 12) return -1; /* 12: version, empty name, seqid */
        if (in->len - in->off - 4 < size) {
            /* partial frame: make sure the rest fits, then wait for it */
            if (reserve(in, 4 + size - (in->len - in->off))) return -1;
            return 0;
        }
        const unsigned char *m = f + 4;
        if (get32(m) != (0x80010000u | T_CALL)) return -1; /* strict binary, CALL */
        uint32_t name_len = get32(m + 4);
        if (name_len > size - 12) return -1;
        const unsigned char *name = m + 8;
        size_t args = 8 + (size_t)name_len + 4; /* offset of the args struct in the message */
        if (!(name_len == 4 && memcmp(name, "echo", 4) == 0)) {
            if (unknown_method(c, name, name_len, m + args - 4)) return -1;
            in->off += 4 + size;
            continue;
        }
        /* args must be exactly: STRING field 1, length, bytes, STOP */
        if (size < args + 3 + 4 + 1) return -1;
        const unsigned char *a = m + args;
        if (a[0] != TT_STRING || a[1] != 0 || a[2] != 1) return -1;
        uint32_t dlen = get32(a + 3);
        if ((size_t)dlen != size - args - 3 - 4 - 1 || m[size - 1] != TT_STOP) return -1;
        if (reserve(&c->out, 4 + size)) return -1;
        unsigned char *r = c->out.p + c->out.len;
        memcpy(r, f, 4 + size);
        r[4 + 3] = T_REPLY;
        r[4 + args + 2] = 0; /* field id 1 -> 0 (the result's success field) */
        c->out.len += 4 + size;
        in->off += 4 + size;
        n_calls++;
    }
    return 0;
}

/* Write what is pending. -1: the peer is gone. */
static int flush_out(conn_t *c) {
    buf_t *o = &c->out;
    while (o->off < o->len) {
        ssize_t n = send(c->fd, o->p + o->off, o->len - o->off, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            if (errno == EINTR) continue;
            return -1;
        }
        o->off += (size_t)n;
    }
    shrink(o);
    return 0;
}

/* One read, answer what is whole, try to write. -1: close. */
static int on_readable(conn_t *c) {
    if (reserve(&c->in, READ_MIN)) return -1;
    ssize_t n = read(c->fd, c->in.p + c->in.len, c->in.cap - c->in.len);
    if (n == 0) return -1;
    if (n < 0) return (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) ? 0 : -1;
    c->in.len += (size_t)n;
    if (answer(c)) {
        n_closed_bad++;
        return -1;
    }
    shrink(&c->in);
    return flush_out(c);
}

static int reserve_fd = -1; /* kept to accept-and-close when out of descriptors */

static void on_accept(int lfd) {
    static const int one = 1;
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if ((errno == EMFILE || errno == ENFILE) && reserve_fd >= 0) {
                fprintf(stderr, "thrift_echo_server: out of file descriptors, refusing a connection\n");
                close(reserve_fd);
                fd = accept(lfd, NULL, NULL);
                if (fd >= 0) close(fd);
                reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
                continue;
            }
            if (errno == EINTR || errno == ECONNABORTED) continue;
            return; /* EAGAIN, or a transient error: level-triggered, we will be back */
        }
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        conn_t *c = calloc(1, sizeof *c);
        if (!c) {
            close(fd);
            continue;
        }
        c->fd = fd;
        c->reading = 1;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev)) {
            close(fd);
            free(c);
            continue;
        }
        n_conns++;
    }
}

static volatile sig_atomic_t stop;
static void on_signal(int sig) {
    (void)sig;
    stop = 1;
}

int main(int argc, char **argv) {
    char *end;
    long port = argc == 2 ? strtol(argv[1], &end, 10) : -1;
    if (argc != 2 || *end || port < 0 || port > 65535) {
        fprintf(stderr, "usage: %s PORT\n", argv[0]);
        return 2;
    }
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t alen = sizeof a;
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&a, sizeof a) || listen(lfd, 4096) ||
        getsockname(lfd, (struct sockaddr *)&a, &alen)) {
        perror("thrift_echo_server: listen");
        return 1;
    }
    reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev);
    printf("listening on 127.0.0.1:%u\n", ntohs(a.sin_port));
    fflush(stdout);

    struct epoll_event evs[512];
    while (!stop) {
        int n = epoll_wait(ep, evs, 512, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            perror("thrift_echo_server: epoll_wait");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            if (evs[i].data.ptr == NULL) {
                on_accept(lfd);
                continue;
            }
            conn_t *c = evs[i].data.ptr;
            uint32_t e = evs[i].events;
            int dead = 0;
            if (e & EPOLLOUT) dead = flush_out(c) < 0;
            if (!dead && (e & (EPOLLIN | EPOLLHUP | EPOLLERR))) dead = on_readable(c) < 0;
            if (dead) {
                close_conn(c);
                continue;
            }
            set_events(c);
        }
    }
    fprintf(stderr, "thrift_echo_server: %llu calls answered, %llu connections, %llu closed for bad frames\n",
            n_calls, n_conns, n_closed_bad);
    return 0;
}
