/* A single-producer / single-consumer record ring in shared memory (see shm_ring.h). */
#include "shm_ring.h"

#include <errno.h>
#include <stdatomic.h>
#include <stddef.h>
#include <string.h>
#include <unistd.h>

#define OFF_MAGIC 0u
#define OFF_VERSION 4u
#define OFF_CAPACITY 8u
#define OFF_HEAD 64u
#define OFF_WRITER_WAITING 72u
#define OFF_TAIL 128u
#define OFF_READER_WAITING 136u

#define WRAP 0xFFFFFFFFu
#define NONE 0xFFFFFFFFu

_Static_assert(sizeof(_Atomic uint64_t) == 8, "64-bit atomics must be plain words");
_Static_assert(SHM_RING_HEADER % 64 == 0, "data starts on a cache line");

static inline _Atomic uint64_t *at64(const shm_ring *r, unsigned off) {
    return (_Atomic uint64_t *)(void *)(r->base + off);
}

static inline _Atomic uint32_t *at32(const shm_ring *r, unsigned off) {
    return (_Atomic uint32_t *)(void *)(r->base + off);
}

static inline uint64_t align8(uint64_t n) { return (n + 7u) & ~(uint64_t)7u; }

static inline int is_pow2(uint64_t n) { return n && !(n & (n - 1)); }

static inline uint32_t load_u32(const unsigned char *p) {
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store_u32(unsigned char *p, uint32_t v) { memcpy(p, &v, sizeof v); }

static int corrupt(shm_ring *r) {
    r->corrupt = 1;
    return SHM_RING_ECORRUPT;
}

uint64_t shm_ring_region_size(uint64_t capacity) { return SHM_RING_HEADER + capacity; }

uint32_t shm_ring_max_record(uint64_t capacity) {
    /* Half the ring: a record of this size always fits once the ring is empty,
     * wherever the empty ring's position is (with or without a wrap). */
    uint64_t m = capacity / 2 - 8;
    return m > 0x7FFFFFFFu ? 0x7FFFFFFFu : (uint32_t)m;
}

int shm_ring_init(void *region, uint64_t region_size, uint64_t capacity) {
    if (!region || !is_pow2(capacity) || capacity < SHM_RING_MIN_CAPACITY || capacity > SHM_RING_MAX_CAPACITY ||
        region_size < shm_ring_region_size(capacity))
        return SHM_RING_EINVAL;
    unsigned char *b = region;
    memset(b, 0, SHM_RING_HEADER);
    shm_ring tmp = {.base = b};
    atomic_store_explicit(at64(&tmp, OFF_HEAD), 0, memory_order_relaxed);
    atomic_store_explicit(at64(&tmp, OFF_TAIL), 0, memory_order_relaxed);
    atomic_store_explicit(at32(&tmp, OFF_READER_WAITING), 0, memory_order_relaxed);
    atomic_store_explicit(at32(&tmp, OFF_WRITER_WAITING), 0, memory_order_relaxed);
    memcpy(b + OFF_CAPACITY, &capacity, sizeof capacity);
    uint32_t version = SHM_RING_VERSION, magic = SHM_RING_MAGIC;
    memcpy(b + OFF_VERSION, &version, sizeof version);
    atomic_thread_fence(memory_order_release);
    memcpy(b + OFF_MAGIC, &magic, sizeof magic);
    return SHM_RING_OK;
}

int shm_ring_attach(shm_ring *r, void *region, uint64_t region_size) {
    if (!r || !region || region_size < SHM_RING_HEADER + SHM_RING_MIN_CAPACITY) return SHM_RING_EINVAL;
    unsigned char *b = region;
    uint32_t magic, version;
    uint64_t capacity;
    memcpy(&magic, b + OFF_MAGIC, sizeof magic);
    atomic_thread_fence(memory_order_acquire);
    memcpy(&version, b + OFF_VERSION, sizeof version);
    memcpy(&capacity, b + OFF_CAPACITY, sizeof capacity);
    if (magic != SHM_RING_MAGIC || version != SHM_RING_VERSION || !is_pow2(capacity) ||
        capacity < SHM_RING_MIN_CAPACITY || capacity > SHM_RING_MAX_CAPACITY ||
        shm_ring_region_size(capacity) > region_size)
        return SHM_RING_EINVAL;
    memset(r, 0, sizeof *r);
    r->base = b;
    r->data = b + SHM_RING_HEADER;
    r->capacity = capacity;
    r->mask = capacity - 1;
    /* Each side starts from the shared counters once; from then on it keeps
     * its own and only validates the other's. */
    r->head = atomic_load_explicit(at64(r, OFF_HEAD), memory_order_acquire);
    r->tail = atomic_load_explicit(at64(r, OFF_TAIL), memory_order_acquire);
    if (r->tail > r->head || r->head - r->tail > capacity || (r->head | r->tail) & 7u) return SHM_RING_EINVAL;
    r->reserved_len = NONE;
    r->peeked_len = NONE;
    return SHM_RING_OK;
}

/* -- producer ----------------------------------------------------------- */

/* The consumer's tail, checked: monotonic, not past our head, not more than a ring behind. */
static int fresh_tail(shm_ring *r, uint64_t *tail) {
    uint64_t t = atomic_load_explicit(at64(r, OFF_TAIL), memory_order_acquire);
    if (t < r->seen || t > r->head || r->head - t > r->capacity || (t & 7u)) return corrupt(r);
    r->seen = t;
    *tail = t;
    return SHM_RING_OK;
}

/* Where a record of `need` bytes would start (a counter), or EAGAIN. */
static int place(shm_ring *r, uint64_t need, uint64_t tail, uint64_t *at) {
    uint64_t free_bytes = r->capacity - (r->head - tail);
    uint64_t contig = r->capacity - (r->head & r->mask);
    if (need <= contig) {
        if (need > free_bytes) return SHM_RING_EAGAIN;
        *at = r->head;
    } else {
        if (contig + need > free_bytes) return SHM_RING_EAGAIN;
        *at = r->head + contig;
    }
    return SHM_RING_OK;
}

int shm_ring_reserve(shm_ring *r, uint32_t len, void **out) {
    if (r->corrupt) return SHM_RING_ECORRUPT;
    if (r->reserved_len != NONE) return SHM_RING_ESTATE;
    if (len > shm_ring_max_record(r->capacity)) return SHM_RING_ETOOBIG;
    uint64_t tail, at;
    int rc = fresh_tail(r, &tail);
    if (rc) return rc;
    rc = place(r, align8(4u + (uint64_t)len), tail, &at);
    if (rc) return rc;
    r->reserved_at = at;
    r->reserved_len = len;
    *out = r->data + (at & r->mask) + 4;
    return SHM_RING_OK;
}

int shm_ring_commit(shm_ring *r) {
    if (r->corrupt) return SHM_RING_ECORRUPT;
    if (r->reserved_len == NONE) return SHM_RING_ESTATE;
    if (r->reserved_at != r->head) /* the record wrapped: mark the unused end */
        store_u32(r->data + (r->head & r->mask), WRAP);
    store_u32(r->data + (r->reserved_at & r->mask), r->reserved_len);
    r->head = r->reserved_at + align8(4u + (uint64_t)r->reserved_len);
    r->reserved_len = NONE;
    atomic_store_explicit(at64(r, OFF_HEAD), r->head, memory_order_release);
    return SHM_RING_OK;
}

int shm_ring_write(shm_ring *r, const void *buf, uint32_t len) {
    void *p;
    int rc = shm_ring_reserve(r, len, &p);
    if (rc) return rc;
    if (len) memcpy(p, buf, len);
    return shm_ring_commit(r);
}

/* The largest payload that fits now (0 if none), given a fresh tail. */
static uint64_t fits_now(shm_ring *r, uint64_t tail) {
    uint64_t free_bytes = r->capacity - (r->head - tail);
    uint64_t contig = r->capacity - (r->head & r->mask);
    uint64_t here = contig < free_bytes ? contig : free_bytes;
    uint64_t wrapped = free_bytes > contig ? free_bytes - contig : 0;
    uint64_t x = here > wrapped ? here : wrapped;
    x &= ~(uint64_t)7u;
    if (x < 8) return 0;
    uint64_t p = x - 4;
    uint64_t m = shm_ring_max_record(r->capacity);
    return p < m ? p : m;
}

int64_t shm_ring_write_some(shm_ring *r, const void *buf, uint64_t len) {
    const unsigned char *src = buf;
    uint64_t done = 0;
    while (done < len) {
        if (r->corrupt) return SHM_RING_ECORRUPT;
        uint64_t tail;
        int rc = fresh_tail(r, &tail);
        if (rc) return rc;
        uint64_t room = fits_now(r, tail);
        if (room == 0) break;
        uint64_t n = len - done < room ? len - done : room;
        rc = shm_ring_write(r, src + done, (uint32_t)n);
        if (rc) return rc;
        done += n;
    }
    return (int64_t)done;
}

int shm_ring_writable(shm_ring *r, uint32_t len) {
    uint64_t tail, at;
    if (r->corrupt || fresh_tail(r, &tail)) return 0;
    if (len > shm_ring_max_record(r->capacity)) len = shm_ring_max_record(r->capacity);
    return place(r, align8(4u + (uint64_t)len), tail, &at) == SHM_RING_OK;
}

/* -- consumer ----------------------------------------------------------- */

static int fresh_head(shm_ring *r, uint64_t *head) {
    uint64_t h = atomic_load_explicit(at64(r, OFF_HEAD), memory_order_acquire);
    if (h < r->seen || h < r->tail || h - r->tail > r->capacity || (h & 7u)) return corrupt(r);
    r->seen = h;
    *head = h;
    return SHM_RING_OK;
}

int shm_ring_peek(shm_ring *r, void **out, uint32_t *len) {
    if (r->corrupt) return SHM_RING_ECORRUPT;
    if (r->peeked_len != NONE) {
        *out = r->data + ((r->peeked_at - align8(4u + (uint64_t)r->peeked_len)) & r->mask) + 4;
        *len = r->peeked_len;
        return SHM_RING_OK;
    }
    uint64_t head;
    int rc = fresh_head(r, &head);
    if (rc) return rc;
    for (int hops = 0; hops < 2; hops++) {
        uint64_t avail = head - r->tail;
        if (avail == 0) return SHM_RING_EAGAIN;
        uint64_t pos = r->tail & r->mask;
        uint64_t contig = r->capacity - pos;
        if (avail < 8) return corrupt(r);
        uint32_t n = load_u32(r->data + pos);
        if (n == WRAP) {
            if (contig > avail || pos == 0) return corrupt(r);
            r->tail += contig; /* skip the unused end; publish it so the space is free again */
            atomic_store_explicit(at64(r, OFF_TAIL), r->tail, memory_order_release);
            continue;
        }
        uint64_t need = align8(4u + (uint64_t)n);
        if (n > shm_ring_max_record(r->capacity) || need > contig || need > avail) return corrupt(r);
        r->peeked_len = n;
        r->peeked_at = r->tail + need;
        *out = r->data + pos + 4;
        *len = n;
        return SHM_RING_OK;
    }
    return corrupt(r); /* two wrap markers in a row */
}

int shm_ring_release(shm_ring *r) {
    if (r->corrupt) return SHM_RING_ECORRUPT;
    if (r->peeked_len == NONE) return SHM_RING_ESTATE;
    r->tail = r->peeked_at;
    r->peeked_len = NONE;
    atomic_store_explicit(at64(r, OFF_TAIL), r->tail, memory_order_release);
    return SHM_RING_OK;
}

int shm_ring_read(shm_ring *r, void *buf, uint32_t cap, uint32_t *len) {
    void *p;
    uint32_t n;
    int rc = shm_ring_peek(r, &p, &n);
    if (rc) return rc;
    if (n > cap) {
        *len = n;
        return SHM_RING_ETOOBIG;
    }
    if (n) memcpy(buf, p, n);
    *len = n;
    return shm_ring_release(r);
}

int64_t shm_ring_read_some(shm_ring *r, void *buf, uint64_t cap, uint32_t *offset) {
    unsigned char *dst = buf;
    uint64_t done = 0;
    while (done < cap) {
        void *p;
        uint32_t n;
        int rc = shm_ring_peek(r, &p, &n);
        if (rc == SHM_RING_EAGAIN) break;
        if (rc) return rc;
        if (*offset > n) return corrupt(r);
        uint64_t take = n - *offset;
        if (take > cap - done) take = cap - done;
        memcpy(dst + done, (unsigned char *)p + *offset, take);
        done += take;
        *offset += (uint32_t)take;
        if (*offset == n) {
            *offset = 0;
            rc = shm_ring_release(r);
            if (rc) return rc;
        }
    }
    return (int64_t)done;
}

int shm_ring_readable(shm_ring *r) {
    uint64_t head;
    if (r->corrupt) return 1; /* let the reader see the error */
    if (r->peeked_len != NONE) return 1;
    if (fresh_head(r, &head)) return 1;
    return head != r->tail;
}

/* -- wake-ups: a flag in shared memory, then a re-check across a full fence
 * (the other side stores its counter, fences, then reads the flag), so one of
 * the two always sees the other: no lost wake-up, no syscall while busy. -- */

int shm_ring_reader_sleep(shm_ring *r) {
    atomic_store_explicit(at32(r, OFF_READER_WAITING), 1, memory_order_seq_cst);
    atomic_thread_fence(memory_order_seq_cst);
    if (shm_ring_readable(r)) {
        atomic_store_explicit(at32(r, OFF_READER_WAITING), 0, memory_order_relaxed);
        return 1;
    }
    return 0;
}

void shm_ring_reader_awake(shm_ring *r) {
    atomic_store_explicit(at32(r, OFF_READER_WAITING), 0, memory_order_relaxed);
}

int shm_ring_reader_needs_wake(shm_ring *r) {
    atomic_thread_fence(memory_order_seq_cst);
    if (!atomic_load_explicit(at32(r, OFF_READER_WAITING), memory_order_relaxed)) return 0;
    return atomic_exchange_explicit(at32(r, OFF_READER_WAITING), 0, memory_order_seq_cst) != 0;
}

int shm_ring_writer_sleep(shm_ring *r, uint32_t len) {
    atomic_store_explicit(at32(r, OFF_WRITER_WAITING), 1, memory_order_seq_cst);
    atomic_thread_fence(memory_order_seq_cst);
    if (shm_ring_writable(r, len) || r->corrupt) { /* corrupt: let the writer see the error */
        atomic_store_explicit(at32(r, OFF_WRITER_WAITING), 0, memory_order_relaxed);
        return 1;
    }
    return 0;
}

void shm_ring_writer_awake(shm_ring *r) {
    atomic_store_explicit(at32(r, OFF_WRITER_WAITING), 0, memory_order_relaxed);
}

int shm_ring_writer_needs_wake(shm_ring *r) {
    atomic_thread_fence(memory_order_seq_cst);
    if (!atomic_load_explicit(at32(r, OFF_WRITER_WAITING), memory_order_relaxed)) return 0;
    return atomic_exchange_explicit(at32(r, OFF_WRITER_WAITING), 0, memory_order_seq_cst) != 0;
}

int shm_ring_doorbell_ring(int fd) {
    uint64_t one = 1;
    ssize_t n = write(fd, &one, sizeof one);
    if (n == (ssize_t)sizeof one || (n < 0 && errno == EAGAIN)) return 0; /* EAGAIN: already rung to the brim */
    return n < 0 ? -errno : -EIO;
}

int shm_ring_doorbell_drain(int fd) {
    uint64_t v;
    ssize_t n = read(fd, &v, sizeof v);
    if (n == (ssize_t)sizeof v || (n < 0 && errno == EAGAIN)) return 0;
    return n < 0 ? -errno : -EIO;
}
