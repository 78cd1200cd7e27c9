/* The shared-memory ring from C: ping-pong round trip and one-way throughput.
 *
 *     shm_ring_bench pingpong SIZE COUNT
 *     shm_ring_bench stream SIZE TOTAL_BYTES
 *
 * Builds against meshproxy/shm_ring.c. One memfd holds two 4 MiB rings; the
 * process forks, parent on CPU 0 and child on CPU 1. A waiting side spins on
 * the ring for a while, then sets its waiting flag and sleeps on its eventfd,
 * exactly as meshproxy.shm does. Prints one JSON line.
 */
#define _GNU_SOURCE
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "shm_ring.h"

#define RING (4u << 20)
#define SPINS 20000

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void pin(int cpu) {
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(cpu, &s);
    sched_setaffinity(0, sizeof s, &s);
}

/* Wait until the ring has a record: spin, then sleep on the doorbell. */
static void wait_data(shm_ring *r, int fd) {
    for (int i = 0; i < SPINS; i++)
        if (shm_ring_readable(r)) return;
    while (!shm_ring_readable(r)) {
        if (shm_ring_reader_sleep(r)) return;
        struct pollfd p = {.fd = fd, .events = POLLIN};
        poll(&p, 1, 1000);
        shm_ring_reader_awake(r);
        shm_ring_doorbell_drain(fd);
    }
}

static void wait_space(shm_ring *r, int fd, uint32_t len) {
    for (int i = 0; i < SPINS; i++)
        if (shm_ring_writable(r, len)) return;
    while (!shm_ring_writable(r, len)) {
        if (shm_ring_writer_sleep(r, len)) return;
        struct pollfd p = {.fd = fd, .events = POLLIN};
        poll(&p, 1, 1000);
        shm_ring_writer_awake(r);
        shm_ring_doorbell_drain(fd);
    }
}

static void send_msg(shm_ring *r, int data_fd, int space_fd, const void *buf, uint32_t len) {
    while (shm_ring_write(r, buf, len) == SHM_RING_EAGAIN) wait_space(r, space_fd, len);
    if (shm_ring_reader_needs_wake(r)) shm_ring_doorbell_ring(data_fd);
}

static uint32_t recv_msg(shm_ring *r, int data_fd, int space_fd, void *buf, uint32_t cap) {
    uint32_t n;
    int rc;
    while ((rc = shm_ring_read(r, buf, cap, &n)) == SHM_RING_EAGAIN) wait_data(r, data_fd);
    if (rc) { fprintf(stderr, "read: %d\n", rc); exit(1); }
    if (shm_ring_writer_needs_wake(r)) shm_ring_doorbell_ring(space_fd);
    return n;
}

static int cmp(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: %s pingpong|stream SIZE COUNT|TOTAL\n", argv[0]); return 2; }
    int pingpong = !strcmp(argv[1], "pingpong");
    uint32_t size = (uint32_t)atol(argv[2]);
    uint64_t count = (uint64_t)atoll(argv[3]);
    uint64_t region = shm_ring_region_size(RING);
    uint64_t total = 2 * region;
    int mfd = memfd_create("bench", 0);
    if (ftruncate(mfd, (off_t)total)) { perror("ftruncate"); return 1; }
    unsigned char *base = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    shm_ring_init(base, region, RING);
    shm_ring_init(base + region, region, RING);
    int up_data = eventfd(0, EFD_NONBLOCK), up_space = eventfd(0, EFD_NONBLOCK);
    int down_data = eventfd(0, EFD_NONBLOCK), down_space = eventfd(0, EFD_NONBLOCK);
    shm_ring up, down;
    shm_ring_attach(&up, base, region);
    shm_ring_attach(&down, base + region, region);
    unsigned char *buf = malloc(size ? size : 1);
    memset(buf, 'x', size);
    pid_t child = fork();
    if (child == 0) {
        pin(1);
        if (pingpong) {
            for (uint64_t i = 0; i < count; i++) {
                uint32_t n = recv_msg(&up, up_data, up_space, buf, size);
                send_msg(&down, down_data, down_space, buf, n);
            }
        } else {
            uint64_t got = 0;
            while (got < count) got += recv_msg(&up, up_data, up_space, buf, size);
            send_msg(&down, down_data, down_space, buf, 1);
        }
        _exit(0);
    }
    pin(0);
    uint64_t start = now_ns();
    if (pingpong) {
        uint64_t *rtt = malloc(count * sizeof *rtt);
        for (uint64_t i = 0; i < count; i++) {
            uint64_t t = now_ns();
            send_msg(&up, up_data, up_space, buf, size);
            recv_msg(&down, down_data, down_space, buf, size);
            rtt[i] = now_ns() - t;
        }
        double secs = (double)(now_ns() - start) / 1e9;
        qsort(rtt, count, sizeof *rtt, cmp);
        printf("{\"mode\": \"pingpong\", \"size\": %u, \"count\": %llu, \"seconds\": %.4f, \"rtt_p50_us\": %.2f, "
               "\"rtt_mean_us\": %.2f}\n", size, (unsigned long long)count, secs, (double)rtt[count / 2] / 1e3,
               secs * 1e6 / (double)count);
    } else {
        for (uint64_t sent = 0; sent < count; sent += size) send_msg(&up, up_data, up_space, buf, size);
        recv_msg(&down, down_data, down_space, buf, size);
        double secs = (double)(now_ns() - start) / 1e9;
        printf("{\"mode\": \"stream\", \"size\": %u, \"bytes\": %llu, \"seconds\": %.4f, \"mib_per_s\": %.1f}\n", size,
               (unsigned long long)count, secs, (double)count / secs / (1 << 20));
    }
    waitpid(child, NULL, 0);
    return 0;
}
