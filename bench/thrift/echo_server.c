/* A fast Thrift echo backend for the benchmark: framed transport, strict binary.
 *
 * For each CALL of a method whose args struct starts with field 1, it answers
 * a REPLY with the same name and seqid whose result struct is the same bytes
 * as field 0: echo(1: binary data) -> {0: data}. Single thread, epoll,
 * non-blocking; pipelined frames are answered in order; a malformed or
 * oversized frame closes that connection.
 *
 *     echo_server PORT
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_FRAME (16u << 20)
#define READ_CHUNK (256u << 10)

typedef struct {
    int fd;
    unsigned char *in;
    size_t in_len, in_cap;
    unsigned char *out;
    size_t out_len, out_off, out_cap;
} conn_t;

static int grow(unsigned char **buf, size_t *cap, size_t need) {
    if (need <= *cap) return 0;
    size_t n = *cap ? *cap : 65536;
    while (n < need) n *= 2;
    unsigned char *p = realloc(*buf, n);
    if (!p) return -1;
    *buf = p;
    *cap = n;
    return 0;
}

static void close_conn(int ep, conn_t *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->in);
    free(c->out);
    free(c);
}

/* Turn every whole frame in c->in into a reply in c->out; -1 on a bad frame. */
static int answer(conn_t *c) {
    size_t pos = 0;
    while (c->in_len - pos >= 4) {
        uint32_t size;
        memcpy(&size, c->in + pos, 4);
        size = ntohl(size);
        if (size > MAX_FRAME || size < 12) return -1;
        if (c->in_len - pos - 4 < size) break;
        unsigned char *msg = c->in + pos + 4;
        if (msg[0] != 0x80 || msg[1] != 0x01 || msg[3] != 1) return -1;
        uint32_t name_len;
        memcpy(&name_len, msg + 4, 4);
        name_len = ntohl(name_len);
        size_t field = 8 + (size_t)name_len + 4; /* version, name, seqid */
        if (field + 3 > size) return -1;
        if (grow(&c->out, &c->out_cap, c->out_len + 4 + size)) return -1;
        unsigned char *r = c->out + c->out_len;
        memcpy(r, c->in + pos, 4 + size);
        r[4 + 3] = 2; /* REPLY */
        if (r[4 + field] != 0) { r[4 + field + 1] = 0; r[4 + field + 2] = 0; } /* field 1 -> 0 */
        c->out_len += 4 + size;
        pos += 4 + size;
    }
    memmove(c->in, c->in + pos, c->in_len - pos);
    c->in_len -= pos;
    return 0;
}

static int flush_out(int ep, conn_t *c) {
    while (c->out_off < c->out_len) {
        ssize_t n = write(c->fd, c->out + c->out_off, c->out_len - c->out_off);
        if (n < 0) {
            if (errno == EAGAIN) {
                struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                return 0;
            }
            return -1;
        }
        c->out_off += (size_t)n;
    }
    c->out_len = c->out_off = 0;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: %s PORT\n", argv[0]); return 2; }
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[1]))};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(lfd, (struct sockaddr *)&a, sizeof a) || listen(lfd, 1024)) { perror("listen"); return 1; }
    int ep = epoll_create1(0);
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev);
    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        for (int i = 0; i < n; i++) {
            if (evs[i].data.ptr == NULL) {
                int fd;
                while ((fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    conn_t *c = calloc(1, sizeof *c);
                    c->fd = fd;
                    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
                }
                continue;
            }
            conn_t *c = evs[i].data.ptr;
            int dead = 0;
            if (evs[i].events & EPOLLOUT) dead = flush_out(ep, c) < 0;
            if (!dead && (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))) {
                for (;;) {
                    if (grow(&c->in, &c->in_cap, c->in_len + READ_CHUNK)) { dead = 1; break; }
                    ssize_t r = read(c->fd, c->in + c->in_len, READ_CHUNK);
                    if (r > 0) { c->in_len += (size_t)r; if ((size_t)r < READ_CHUNK) break; continue; }
                    if (r < 0 && errno == EAGAIN) break;
                    dead = 1;
                    break;
                }
                if (!dead && answer(c) < 0) dead = 1;
                if (!dead && c->out_len && !(c->out_off)) dead = flush_out(ep, c) < 0;
            }
            if (dead) close_conn(ep, c);
        }
    }
}
