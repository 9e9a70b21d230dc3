# cython: language_level=3
"""The process-wide thread pool of the compiled engine (``pool.h``), shared by the kernel modules."""

ctypedef void (*sm_task_fn)(void* ctx, Py_ssize_t item, int slot) noexcept nogil
ctypedef void (*sm_tile_fn)(void* ctx, Py_ssize_t I, Py_ssize_t J, int slot) noexcept nogil

cdef int team(Py_ssize_t units, double work, double min_work) noexcept nogil
cdef int num_threads() noexcept nogil
cdef int parallel_for(Py_ssize_t n, int nthreads, sm_task_fn fn, void* ctx) noexcept nogil
# workspaces on whole cache lines (pool.h): a length in doubles rounded up to
# whole lines, and a line-aligned allocation and its free
cdef Py_ssize_t slot_len(Py_ssize_t n) noexcept nogil
cdef void* alloc_lines(size_t nbytes) noexcept nogil
cdef void free_lines(void* p) noexcept nogil
cdef int parallel_for_work(Py_ssize_t n, int nthreads, sm_task_fn fn, void* ctx, double** work,
                           Py_ssize_t* per_slot) noexcept nogil
cdef int wavefront(Py_ssize_t nI, Py_ssize_t nJ, int reverse, sm_tile_fn fn, void* ctx,
                   int* done, int nthreads) noexcept nogil
