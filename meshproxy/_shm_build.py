"""cffi out-of-line (API mode) builder for the shared-memory ring.

setup.py names it in `cffi_modules`, so `pip install` compiles
meshproxy/shm_ring.c into the extension module `meshproxy._shm_ring`.
"""

from __future__ import annotations

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

CDEF = """
typedef struct shm_ring {
    unsigned char *base;
    unsigned char *data;
    uint64_t capacity, mask;
    uint64_t head, tail;
    uint64_t seen;
    uint64_t reserved_at;
    uint32_t reserved_len;
    uint32_t peeked_len;
    uint64_t peeked_at;
    int corrupt;
} shm_ring;

#define SHM_RING_HEADER 192
#define SHM_RING_OK 0
#define SHM_RING_EAGAIN -1
#define SHM_RING_ETOOBIG -2
#define SHM_RING_ECORRUPT -3
#define SHM_RING_EINVAL -4
#define SHM_RING_ESTATE -5

uint64_t shm_ring_region_size(uint64_t capacity);
uint32_t shm_ring_max_record(uint64_t capacity);
int shm_ring_init(void *region, uint64_t region_size, uint64_t capacity);
int shm_ring_attach(shm_ring *r, void *region, uint64_t region_size);
int shm_ring_reserve(shm_ring *r, uint32_t len, void **out);
int shm_ring_commit(shm_ring *r);
int shm_ring_write(shm_ring *r, const void *buf, uint32_t len);
int64_t shm_ring_write_some(shm_ring *r, const void *buf, uint64_t len);
int shm_ring_peek(shm_ring *r, void **out, uint32_t *len);
int shm_ring_release(shm_ring *r);
int shm_ring_read(shm_ring *r, void *buf, uint32_t cap, uint32_t *len);
int64_t shm_ring_read_some(shm_ring *r, void *buf, uint64_t cap, uint32_t *offset);
int shm_ring_readable(shm_ring *r);
int shm_ring_writable(shm_ring *r, uint32_t len);
int shm_ring_reader_sleep(shm_ring *r);
void shm_ring_reader_awake(shm_ring *r);
int shm_ring_reader_needs_wake(shm_ring *r);
int shm_ring_writer_sleep(shm_ring *r, uint32_t len);
void shm_ring_writer_awake(shm_ring *r);
int shm_ring_writer_needs_wake(shm_ring *r);
int shm_ring_doorbell_ring(int fd);
int shm_ring_doorbell_drain(int fd);
"""

COMPILE_ARGS = ["-std=c11", "-O2", "-Wall", "-Wextra"]


def make(module: str = "meshproxy._shm_ring", extra_args: tuple[str, ...] = (), absolute: bool = False) -> FFI:
    """The builder; setuptools wants paths relative to the project root, a test build absolute ones."""
    src = HERE if absolute else Path("meshproxy")
    ffi = FFI()
    ffi.cdef(CDEF)
    ffi.set_source(
        module,
        '#include "shm_ring.h"',
        sources=[str(src / "shm_ring.c")],
        include_dirs=[str(src)],
        extra_compile_args=[*COMPILE_ARGS, *extra_args],
        extra_link_args=list(extra_args),
    )
    return ffi


ffibuilder = make()

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
