/* A single-producer / single-consumer byte-record ring in shared memory.
 *
 * Layout of one ring (all offsets from the start of its region):
 *
 *   0    magic u32 | version u32 | capacity u64              (written once by the creator)
 *   64   head: u64 bytes ever committed by the producer      (producer writes, release)
 *        writer_waiting: u32 (the producer sleeps for space)
 *   128  tail: u64 bytes ever released by the consumer      (consumer writes, release)
 *        reader_waiting: u32 (the consumer sleeps for data)
 *   192  data[capacity]                                     (capacity a power of two)
 *
 * A record is a u32 length, the payload, and padding to 8 bytes. A length of
 * SHM_RING_WRAP means "the rest of the buffer is unused; continue at 0".
 * head and tail count bytes forever (u64 does not wrap in practice); a
 * position is count & (capacity - 1).
 *
 * Neither side trusts the other: every index and length read from shared
 * memory is checked (tail <= head <= tail + capacity, both monotonic; a
 * record lies inside what was committed and inside the buffer), and a
 * violation returns SHM_RING_ECORRUPT and poisons the handle; no access ever
 * leaves the mapped region.
 */
#ifndef MESHPROXY_SHM_RING_H
#define MESHPROXY_SHM_RING_H

#include <stdint.h>

#define SHM_RING_MAGIC 0x4d505352u /* "MPSR" */
#define SHM_RING_VERSION 1u
#define SHM_RING_HEADER 192u
#define SHM_RING_MIN_CAPACITY 64u
#define SHM_RING_MAX_CAPACITY (1ull << 31)

#define SHM_RING_OK 0
#define SHM_RING_EAGAIN (-1)   /* empty (read) or full (write): try later */
#define SHM_RING_ETOOBIG (-2)  /* a record larger than max_record(): split it */
#define SHM_RING_ECORRUPT (-3) /* the shared state is inconsistent: stop using the ring */
#define SHM_RING_EINVAL (-4)   /* bad arguments, or a header that is not a ring */
#define SHM_RING_ESTATE (-5)   /* calls out of order (commit without reserve, ...) */

typedef struct shm_ring {
    unsigned char *base; /* the shared region: header + data */
    unsigned char *data;
    uint64_t capacity, mask;
    uint64_t head, tail;     /* this side's own counter (the one it writes) */
    uint64_t seen;           /* the other side's counter, last value read */
    uint64_t reserved_at;    /* producer: head position of the reserved record */
    uint32_t reserved_len;   /* producer: payload length reserved, 0xFFFFFFFF = none */
    uint32_t peeked_len;     /* consumer: payload length peeked, 0xFFFFFFFF = none */
    uint64_t peeked_at;      /* consumer: tail after the peeked record */
    int corrupt;
} shm_ring;

/* Bytes a ring with `capacity` data bytes needs (header included). */
uint64_t shm_ring_region_size(uint64_t capacity);

/* The largest payload one record may hold in a ring of this capacity. */
uint32_t shm_ring_max_record(uint64_t capacity);

/* Initialise a new ring in `region` (`region_size` bytes); the creator calls this once. */
int shm_ring_init(void *region, uint64_t region_size, uint64_t capacity);

/* Attach a handle to an existing ring; checks magic, version and capacity against the size. */
int shm_ring_attach(shm_ring *r, void *region, uint64_t region_size);

/* -- producer -- */
int shm_ring_reserve(shm_ring *r, uint32_t len, void **out);
int shm_ring_commit(shm_ring *r);
int shm_ring_write(shm_ring *r, const void *buf, uint32_t len);
/* Write as much of buf as fits, as records of at most max_record bytes; returns bytes written or an error. */
int64_t shm_ring_write_some(shm_ring *r, const void *buf, uint64_t len);

/* -- consumer -- */
int shm_ring_peek(shm_ring *r, void **out, uint32_t *len);
int shm_ring_release(shm_ring *r);
/* Copy the next record out: SHM_RING_ETOOBIG (nothing consumed) if it is larger than cap. */
int shm_ring_read(shm_ring *r, void *buf, uint32_t cap, uint32_t *len);
/* Copy out up to cap bytes from whole and partial records; `*offset` is the
 * consumer's position inside the current record (kept by the caller). */
int64_t shm_ring_read_some(shm_ring *r, void *buf, uint64_t cap, uint32_t *offset);

/* -- state, for wake-ups -- */
int shm_ring_readable(shm_ring *r);            /* consumer: a record is waiting (re-reads head) */
int shm_ring_writable(shm_ring *r, uint32_t len); /* producer: a record of len fits now */

/* The consumer is about to sleep: sets reader_waiting, then re-checks for data
 * (a full fence between): returns 1 if data arrived meanwhile (do not sleep). */
int shm_ring_reader_sleep(shm_ring *r);
void shm_ring_reader_awake(shm_ring *r);
/* After committing: 1 if the consumer sleeps and must be woken (rings its doorbell). */
int shm_ring_reader_needs_wake(shm_ring *r);

/* The same pair for a producer waiting for space. */
int shm_ring_writer_sleep(shm_ring *r, uint32_t len);
void shm_ring_writer_awake(shm_ring *r);
int shm_ring_writer_needs_wake(shm_ring *r);

/* Ring an eventfd doorbell / drain it (-errno on failure). */
int shm_ring_doorbell_ring(int fd);
int shm_ring_doorbell_drain(int fd);

#endif
