# cython: language_level=3, boundscheck=False, wraparound=False
"""The cuda device's host-to-device hot path in C, over a table of driver calls
(``driver.pyx``): the real driver where ``cudadriver`` is built, or a Python fake
(``pipellm.devices.fakedriver``) anywhere.

A *group* is the unit of verification: its messages' ciphertexts are copied into a
staging ring, one driver call per message; their rows (IV, header, tag, offset, length,
destination) are written into page-locked host memory in C. Launching a group costs a
fixed number of calls: an event behind its copies that the kernel stream waits for, one
copy of its rows, three AES-GCM launches per key (GHASH, tag check, CTR), a commit
launch that copies to each destination only the plaintext of messages whose transfer,
and every message before it in the group, verified and only while the session's
refusal flag on the GPU is clear (so groups queued behind a refused one commit
nothing, with no host round trip), a status launch that finds the first refused message
and raises the flag, the status copied back, and an event. The host learns a group's
outcome by querying that event (``result``); it waits (the GIL released) only when
asked to or when the staging ring is full.

The kernels are numba-cuda's, loaded as PTX; their parameter blocks are packed in C
(``kernelparams.pxd``).
"""

from libc.stdint cimport int64_t, uint64_t, uintptr_t
from libc.string cimport memset

from pipellm._ext.driver cimport Driver, check, launch, record_and_wait
from pipellm._ext.drivertable cimport DriverTable, NOT_READY
from pipellm._ext.kernelparams cimport (AAD_MAX, CHUNK_BLOCKS, ROW_AAD, ROW_BYTES, ROW_DST, ROW_IV, ROW_LEN,
                                        ROW_OFF, ROW_TAG, ROW_UPTO, THREADS, Params, array1, array2,
                                        be_words, chunks_for, ctr_params, ghash_params, scalar, tag_params)

from pipellm.errors import ArgumentError, DeviceError

DEF MAX_GROUPS = 8      # groups in flight
DEF MAX_RUNS = 32       # runs of messages under one key in a group (3 launches each)
DEF COMMIT_BLOCKS = 256

AAD_BYTES = AAD_MAX
ROW = ROW_BYTES
MAX_IN_FLIGHT = MAX_GROUPS  # groups launched whose outcome is not yet read, at most
KERNELS = ("ghash_kernel", "tag_kernel", "ctr_kernel", "commit_kernel", "status_kernel", "spin_kernel")


def chunks_needed(int64_t nbytes) -> int:
    """GHASH chunks a message of ``nbytes`` needs the key's powers of H to cover (with the
    longest AAD the rows hold)."""
    return chunks_for(AAD_MAX, nbytes)


cdef class KeyTables:
    """One AES-256 key's tables in device memory (made and filled by the Python layer):
    round keys (60 words), H's table (2048 words), chunk powers of H (``chunks`` x 4 words)."""

    def __init__(self, uint64_t round_keys, uint64_t h_table, uint64_t powers, int64_t chunks):
        self.round_keys, self.h_table, self.powers, self.chunks = round_keys, h_table, powers, chunks

    def grown(self, uint64_t powers, int64_t chunks) -> None:
        """The powers now cover ``chunks`` (a bigger array, already filled on the kernel stream)."""
        self.powers, self.chunks = powers, chunks

    def max_bytes(self) -> int:
        """The longest message (ciphertext bytes) the powers cover (the inverse of
        :func:`chunks_needed`)."""
        return max(0, (self.chunks * CHUNK_BLOCKS - AAD_MAX // 16 - 1) * 16)


cdef struct Group:
    int64_t id
    int64_t row_start, rows
    size_t byte_end           # the staging ring's head when it was launched
    void* copied              # recorded on the copy stream behind its ciphertexts
    void* done                # recorded on the kernel stream behind its status copy
    bint live                 # launched, its ring space not yet reclaimed
    bint read                 # its outcome not yet handed out


cdef inline size_t _slot(size_t nbytes) noexcept nogil:
    return 16 if nbytes <= 16 else (nbytes + 15) // 16 * 16


cdef class H2DPath:
    """Host-to-device messages staged, verified, decrypted and committed on the GPU in
    groups (see the module docstring). One thread uses it (the copy engine)."""

    cdef Driver driver
    cdef DriverTable* t
    cdef void* ghash
    cdef void* tag
    cdef void* ctr
    cdef void* commit_fn
    cdef void* status_fn
    cdef void* spin_fn
    cdef void* computed        # recorded behind a compute launch
    cdef uint64_t te, cipher, plain, rows_d, acc, ok, flags, status_d, zero_word
    cdef unsigned char* rows_h
    cdef int64_t* status_h
    cdef void* copies          # the copy stream (ciphertexts)
    cdef void* kernels         # the kernel stream (rows, launches, commits, status)
    cdef readonly size_t staging_bytes
    cdef readonly int64_t max_rows, group_rows, sessions, aad_bytes
    cdef Group groups[MAX_GROUPS]
    cdef int64_t next_group
    # the ring of staging bytes: [tail, head) in ring order is live
    cdef size_t head, tail, wrap_at
    cdef bint wrapped
    cdef int64_t live_groups
    cdef size_t saved_head, saved_wrap_at   # the ring before the group being staged (abandon)
    cdef bint saved_wrapped
    # the group being staged
    cdef int64_t row_start, count
    cdef int64_t run_start[MAX_RUNS]
    cdef int64_t run_max[MAX_RUNS]
    cdef list run_keys
    cdef int runs
    cdef int64_t calls_message, calls_group, calls_wait

    def __cinit__(self):
        self.t = NULL
        self.rows_h = NULL
        self.status_h = NULL

    def __init__(self, Driver driver not None, tuple functions not None, *, size_t staging_bytes,
                 int64_t max_rows=1024, int64_t sessions=64, int64_t aad_bytes=56, int64_t group_rows=0):
        if len(functions) != len(KERNELS):
            raise ArgumentError(f"H2DPath needs the handles of {KERNELS}, got {len(functions)}")
        if staging_bytes < 16 or max_rows < 1 or sessions < 1:
            raise ArgumentError(f"staging_bytes >= 16, max_rows >= 1, sessions >= 1; got "
                                f"{staging_bytes}, {max_rows}, {sessions}")
        self.driver, self.t = driver, driver.t
        cdef uintptr_t f0 = functions[0], f1 = functions[1], f2 = functions[2], f3 = functions[3], f4 = functions[4]
        cdef uintptr_t f5 = functions[5]
        self.ghash, self.tag, self.ctr, self.commit_fn, self.status_fn = (<void*>f0, <void*>f1, <void*>f2,
                                                                          <void*>f3, <void*>f4)
        self.spin_fn = <void*>f5
        if not 0 <= aad_bytes <= AAD_MAX:
            raise ArgumentError(f"aad_bytes must be 0..{AAD_MAX}, got {aad_bytes}")
        self.staging_bytes, self.max_rows, self.sessions, self.aad_bytes = staging_bytes, max_rows, sessions, aad_bytes
        self.group_rows = max_rows if group_rows <= 0 else min(group_rows, max_rows)  # messages per group at most
        self.cipher = driver.alloc(staging_bytes + 16)
        self.plain = driver.alloc(staging_bytes + 16)
        self.rows_d = driver.alloc(max_rows * ROW_BYTES)
        self.acc = driver.alloc(max_rows * 16)
        self.ok = driver.alloc(max_rows * 4)
        self.flags = driver.alloc(sessions * 4)
        self.status_d = driver.alloc(MAX_GROUPS * 8)
        self.zero_word = driver.alloc(16)
        self.rows_h = <unsigned char*><uintptr_t>driver.host_alloc(max_rows * ROW_BYTES)
        self.status_h = <int64_t*><uintptr_t>driver.host_alloc(MAX_GROUPS * 8)
        self.copies = <void*><uintptr_t>driver.stream()
        self.kernels = <void*><uintptr_t>driver.stream()
        self.computed = <void*><uintptr_t>driver.event()
        for i in range(MAX_GROUPS):
            self.groups[i].copied = <void*><uintptr_t>driver.event()
            self.groups[i].done = <void*><uintptr_t>driver.event()
            self.groups[i].live = self.groups[i].read = False
            self.groups[i].id = -1
        self.run_keys = []
        self.runs = 0
        self.count = 0
        self.row_start = 0
        self.head = self.tail = self.wrap_at = 0
        self.wrapped = False
        self.live_groups = 0
        self.next_group = 0
        self.calls_message = self.calls_group = self.calls_wait = 0

    def clear_device(self, bytes zeros_acc not None, bytes zeros_flags not None) -> None:
        """Zero the accumulators and refusal flags (queued on the kernel stream; the
        bytes are kept alive by the caller until the stream passed them)."""
        check(self.t, self.t.copy_htod(self.acc, <const char*>zeros_acc, min(len(zeros_acc), self.max_rows * 16),
                                        self.kernels), "cuMemcpyHtoDAsync")
        check(self.t, self.t.copy_htod(self.flags, <const char*>zeros_flags, min(len(zeros_flags), self.sessions * 4),
                                        self.kernels), "cuMemcpyHtoDAsync")
        check(self.t, self.t.copy_htod(self.zero_word, <const char*>zeros_flags, 16, self.kernels),
               "cuMemcpyHtoDAsync")

    def set_te(self, uint64_t te) -> None:
        """The T-table's device address (filled by the caller on the kernel stream)."""
        self.te = te

    @property
    def kernel_stream(self) -> int:
        return <uintptr_t>self.kernels

    @property
    def copy_stream(self) -> int:
        return <uintptr_t>self.copies

    @property
    def idle(self) -> bool:
        """Nothing staged and no group whose ring space is not yet reclaimed."""
        return self.count == 0 and self.live_groups == 0

    @property
    def staged(self) -> int:
        """Messages staged in the group not yet launched."""
        return self.count

    @property
    def calls(self) -> dict:
        """Driver calls made, by where: per message (stage), per group (launch), waiting."""
        return {"message": self.calls_message, "group": self.calls_group, "wait": self.calls_wait}

    # -- the staging ring ------------------------------------------------------------------
    # Live bytes are [tail, head) in ring order; ``wrapped``: they are [tail, wrap_at) and
    # [0, head), the bytes from wrap_at to the end unused. Groups end in launch order, so a
    # retired group's end is the new tail.
    cdef bint _fits_ring(self, size_t n, size_t* at) noexcept:
        if self.live_groups == 0 and self.count == 0:
            self.head = self.tail = 0
            self.wrapped = False
        if not self.wrapped:
            if self.head + n <= self.staging_bytes:
                at[0] = self.head
                return True
            if n <= self.tail:
                at[0] = 0
                return True
            return False
        if self.head + n <= self.tail:
            at[0] = self.head
            return True
        return False

    cdef void _advance(self, size_t at, size_t n) noexcept:
        if at < self.head:
            self.wrapped = True
            self.wrap_at = self.head
        self.head = at + n

    cdef int _passed(self, void* event, bint block, str what) except -1:
        """1 once the work before ``event`` has run; 0 while it has not and ``block`` is
        false; with ``block``, waits for it (GIL released, counted)."""
        cdef int result = self.t.event_query(event)
        if result == NOT_READY:
            if not block:
                return 0
            self.calls_wait += 1
            with nogil:
                result = self.t.event_synchronize(event)
        check(self.t, result, what)
        return 1

    cdef int _retire_oldest(self, bint block) except -1:
        """Reclaim the oldest live group's ring space once its done event passed; with
        ``block`` wait for it (GIL released). Returns 1 if one was retired."""
        cdef Group* g
        cdef int64_t oldest = -1, i
        cdef size_t end
        for i in range(MAX_GROUPS):
            if self.groups[i].live and (oldest < 0 or self.groups[i].id < self.groups[oldest].id):
                oldest = i
        if oldest < 0 or not self._passed(self.groups[oldest].done, block, "waiting for a group"):
            return 0
        g = &self.groups[oldest]
        g.live = False
        self.live_groups -= 1
        end = g.byte_end
        if self.wrapped and end > self.tail:      # it ended in the upper part
            self.tail = end
            if self.tail >= self.wrap_at:
                self.tail, self.wrapped = 0, False
        else:                                     # in the lower part: the upper part is all free
            self.tail, self.wrapped = end, False
        return 1

    cdef bint _rows_free(self, int64_t start, int64_t stop):
        for i in range(MAX_GROUPS):
            g = &self.groups[i]
            if g.live and g.row_start < stop and start < g.row_start + g.rows:
                return False
        return True

    def room(self, size_t nbytes) -> bool:
        """Whether the group being staged takes one more message of ``nbytes`` (ciphertext)
        under any key; if not, launch it first. Reclaims the space of finished groups
        (querying their events) and waits for the oldest only when the ring is full and
        nothing is staged to launch instead."""
        cdef size_t at
        if _slot(nbytes) > self.staging_bytes:
            raise ArgumentError(f"a {nbytes}-byte message does not fit the {self.staging_bytes}-byte staging")
        if self.runs == MAX_RUNS or self.count >= self.group_rows:
            return False
        if self.count >= self.max_rows - self.row_start:
            return self.count == 0 and self._restart_rows()
        while not self._fits_ring(_slot(nbytes), &at) or not self._rows_free(self.row_start,
                                                                              self.row_start + self.count + 1):
            if self.count:
                return False       # launch what is staged; its space comes back in order
            if not self._retire_oldest(True):
                raise DeviceError("the staging ring is full with nothing in flight (a bug)")
        return True

    def reset_flag(self, int64_t session) -> None:
        """Clear a session slot's refusal flag (queued on the kernel stream, before the
        slot's first group): the slot served a session that failed."""
        if not 0 <= session < self.sessions:
            raise ArgumentError(f"session slot {session} is outside 0..{self.sessions - 1}")
        check(self.t, self.t.copy_dtod(self.flags + session * 4, self.zero_word, 4, self.kernels),
               "cuMemcpyDtoDAsync")

    cdef bint _restart_rows(self) except -1:
        # an empty group at the end of the rows starts again at row 0 once that is free
        self.row_start = 0
        while not self._rows_free(0, 1):
            self._retire_oldest(True)
        return True

    def stage(self, KeyTables key not None, const unsigned char[::1] iv not None,
              const unsigned char[::1] aad not None, const unsigned char[::1] payload not None,
              size_t nbytes) -> tuple:
        """Queue the copy of a message (``nbytes`` of ciphertext then its 16-byte tag, in
        ``payload``: keep it unchanged until the group's ``copied`` event passed) into
        staging and write its row. Returns (position in the group, staging offset).
        :meth:`room` must have said yes."""
        cdef size_t at
        cdef int64_t position = self.count
        cdef unsigned char* row
        if iv.shape[0] != 12 or aad.shape[0] != self.aad_bytes or payload.shape[0] < nbytes + 16:
            raise ArgumentError(f"a message needs a 12-byte IV (got {iv.shape[0]}), a {self.aad_bytes}-byte "
                                f"AAD (got {aad.shape[0]}) and its ciphertext and tag "
                                f"({nbytes + 16} bytes, got {payload.shape[0]})")
        if not self._fits_ring(_slot(nbytes), &at) or self.row_start + position >= self.max_rows:
            raise DeviceError("stage() without room(): launch the group first")
        if nbytes > key.max_bytes():
            raise DeviceError(f"a {nbytes}-byte message needs the key's powers grown first "
                              f"(they cover {key.max_bytes()} bytes)")
        if self.runs == MAX_RUNS and key is not self.run_keys[self.runs - 1]:
            raise DeviceError("stage() without room(): too many keys in the group")
        if nbytes:
            check(self.t, self.t.copy_htod(self.cipher + at, &payload[0], nbytes, self.copies), "cuMemcpyHtoDAsync")
            self.calls_message += 1
        if self.count == 0:
            self.saved_head, self.saved_wrapped, self.saved_wrap_at = self.head, self.wrapped, self.wrap_at
        self._advance(at, _slot(nbytes))
        row = self.rows_h + (self.row_start + position) * ROW_BYTES
        memset(row, 0, ROW_BYTES)
        be_words(row + ROW_IV, &iv[0], 12)
        if aad.shape[0]:
            be_words(row + ROW_AAD, &aad[0], aad.shape[0])
        be_words(row + ROW_TAG, &payload[nbytes], 16)
        (<int64_t*>(row + ROW_OFF))[0] = at
        (<int64_t*>(row + ROW_LEN))[0] = nbytes
        if self.runs == 0 or key is not self.run_keys[self.runs - 1]:
            self.run_keys.append(key)
            self.run_start[self.runs] = position
            self.run_max[self.runs] = 0
            self.runs += 1
        if <int64_t>nbytes > self.run_max[self.runs - 1]:
            self.run_max[self.runs - 1] = nbytes
        self.count += 1
        return position, at

    def commit(self, int64_t position, uint64_t destination, int64_t upto) -> None:
        """Commit message ``position``'s plaintext to device address ``destination`` if
        messages 0..``upto`` of the group verified (and the session's flag is clear)."""
        if not (0 <= position <= upto < self.count) or destination == 0:
            raise ArgumentError(f"commit of message {position} up to {upto}: the group has {self.count} "
                                f"messages (and the destination must not be 0)")
        row = self.rows_h + (self.row_start + position) * ROW_BYTES
        (<int64_t*>(row + ROW_DST))[0] = <int64_t>destination
        (<int64_t*>(row + ROW_UPTO))[0] = upto

    def launch(self, int64_t session) -> int:
        """Queue the group's verification, decryption, commits and status (see the
        module docstring); returns its id for :meth:`result`. Nothing is waited for."""
        cdef Group* g
        cdef Params p
        cdef int64_t n = self.count, a, b, r, slot, blocks
        cdef uint64_t rows = self.rows_d + self.row_start * ROW_BYTES
        cdef uint64_t acc = self.acc + self.row_start * 16, ok = self.ok + self.row_start * 4
        cdef KeyTables key
        if not 0 <= session < self.sessions:
            raise ArgumentError(f"session slot {session} is outside 0..{self.sessions - 1}")
        if n == 0:
            raise ArgumentError("launch() of an empty group")
        slot = self.next_group % MAX_GROUPS
        g = &self.groups[slot]
        while g.live:
            self._retire_oldest(True)
        if g.read:
            raise DeviceError(f"group {g.id}'s outcome was never read: read results in order")
        t = self.t
        self.calls_group += 9 + 3 * (self.runs - 1)
        check(t, t.event_record(g.copied, self.copies), "cuEventRecord")
        check(t, t.stream_wait_event(self.kernels, g.copied), "cuStreamWaitEvent")
        check(t, t.copy_htod(rows, self.rows_h + self.row_start * ROW_BYTES, n * ROW_BYTES, self.kernels),
               "cuMemcpyHtoDAsync")
        for r in range(self.runs):
            key = self.run_keys[r]
            a = self.run_start[r]
            b = self.run_start[r + 1] if r + 1 < self.runs else n
            self._launch_run(key, rows + a * ROW_BYTES, acc + a * 16, ok + a * 4, b - a, self.run_max[r])
        # commit: messages whose transfer verified, while the session's flag is clear
        p.n = 0
        array1(&p, ok, n, 4, 4)
        array2(&p, rows, n, ROW_BYTES // 8, 8, ROW_BYTES)
        array1(&p, self.plain, self.staging_bytes + 16, 1, 1)
        array1(&p, self.flags + session * 4, 1, 4, 4)
        blocks = max(1, min(COMMIT_BLOCKS, (self._group_max() + THREADS - 1) // THREADS))
        launch(self.t, self.commit_fn, blocks, n, THREADS, &p, self.kernels, "commit_kernel")
        # status: the first refused message (-1: none), which raises the session's flag
        p.n = 0
        array1(&p, ok, n, 4, 4)
        array1(&p, self.flags + session * 4, 1, 4, 4)
        array1(&p, self.status_d + slot * 8, 1, 8, 8)
        launch(self.t, self.status_fn, 1, 1, 1, &p, self.kernels, "status_kernel")
        check(t, t.copy_dtoh(&self.status_h[slot], self.status_d + slot * 8, 8, self.kernels), "cuMemcpyDtoHAsync")
        check(t, t.event_record(g.done, self.kernels), "cuEventRecord")
        g.id, g.row_start, g.rows, g.byte_end, g.live, g.read = self.next_group, self.row_start, n, self.head, True, True
        self.live_groups += 1
        self.next_group += 1
        self.row_start += n
        if self.row_start >= self.max_rows:
            self.row_start = 0
        self._forget_group()
        return g.id

    cdef void _forget_group(self) noexcept:
        """No group being staged any more (launched, or abandoned)."""
        self.count = 0
        self.runs = 0
        self.run_keys = []

    cdef int64_t _group_max(self):
        cdef int64_t m = 0
        for r in range(self.runs):
            if self.run_max[r] > m:
                m = self.run_max[r]
        return m

    cdef int _launch_run(self, KeyTables key, uint64_t rows, uint64_t acc, uint64_t ok, int64_t n,
                         int64_t longest) except -1:
        cdef Params p
        cdef int64_t chunks = chunks_for(self.aad_bytes, longest)
        cdef int64_t buffer = self.staging_bytes + 16
        if chunks > key.chunks:
            raise DeviceError(f"the key's powers cover {key.chunks} chunks, the group needs {chunks}")
        ghash_params(&p, key.h_table, key.powers, key.chunks, self.cipher, buffer, rows, n, self.aad_bytes, acc)
        launch(self.t, self.ghash, (chunks + THREADS - 1) // THREADS, n, THREADS, &p, self.kernels, "ghash_kernel")
        tag_params(&p, self.te, key.round_keys, rows, n, acc, ok, 1)
        launch(self.t, self.tag, (n + THREADS - 1) // THREADS, 1, THREADS, &p, self.kernels, "tag_kernel")
        ctr_params(&p, self.te, key.round_keys, rows, n, self.cipher, self.plain, buffer, ok)
        launch(self.t, self.ctr, max(1, ((longest + 15) // 16 + THREADS - 1) // THREADS), n, THREADS, &p,
               self.kernels, "ctr_kernel")
        return 0

    def result(self, int64_t group, bint block=True):
        """The outcome of ``group`` once its done event passed: -1 (every message
        verified; its commits are done on the kernel stream) or the position of the first
        refused message (those before it committed as the contract says, nothing after);
        None if it has not finished and ``block`` is false. Outcomes are read in order."""
        cdef Group* g = &self.groups[group % MAX_GROUPS]
        if g.id != group or not g.read:
            raise ArgumentError(f"group {group} is not awaiting its outcome")
        if g.live:
            if not self._passed(g.done, block, "waiting for a group"):
                return None
            # its space comes back in ring order: retire the older ones (done before it)
            while g.live:
                self._retire_oldest(True)
        g.read = False
        return self.status_h[group % MAX_GROUPS]

    def compute(self, int64_t ns) -> None:
        """Keep the GPU busy for ``ns`` nanoseconds on the kernel stream, behind every
        commit queued before, and wait for it (the GIL released): the device's compute."""
        cdef Params p
        if ns < 0:
            raise ArgumentError(f"compute time must be >= 0 ns, got {ns}")
        p.n = 0
        scalar(&p, ns)
        launch(self.t, self.spin_fn, 1, 1, 1, &p, self.kernels, "spin_kernel")
        record_and_wait(self.t, self.computed, self.kernels, "waiting for compute")

    def copied(self, int64_t group) -> bool:
        """Whether ``group``'s ciphertext copies have run (one event query, no wait): from
        then on the host memory its messages were staged from may be reused."""
        cdef Group* g = &self.groups[group % MAX_GROUPS]
        if g.id != group:
            return True  # long done: its slot was reused by a later group
        return self._passed(g.copied, False, "cuEventQuery") == 1

    def abandon(self) -> None:
        """Forget the group being staged (its copies may still read their slots: the copy
        stream is waited for), as after an op failed part-way."""
        cdef int result
        with nogil:
            result = self.t.stream_synchronize(self.copies)
        check(self.t, result, "cuStreamSynchronize")
        if self.count:  # its staging space comes back
            self.head, self.wrapped, self.wrap_at = self.saved_head, self.saved_wrapped, self.saved_wrap_at
        self._forget_group()

    def close(self) -> None:
        """Wait for everything queued, free the path's memory (idempotent)."""
        if self.t == NULL:
            return
        t, driver = self.t, self.driver
        self.t = NULL
        try:
            driver.synchronize(<uintptr_t>self.copies)
            driver.synchronize(<uintptr_t>self.kernels)
        finally:
            for address in (self.cipher, self.plain, self.rows_d, self.acc, self.ok, self.flags, self.status_d,
                            self.zero_word):
                driver.free(address)
            driver.host_free(<uintptr_t>self.rows_h)
            driver.host_free(<uintptr_t>self.status_h)
            for i in range(MAX_GROUPS):
                driver.event_destroy(<uintptr_t>self.groups[i].copied)
                driver.event_destroy(<uintptr_t>self.groups[i].done)
            driver.event_destroy(<uintptr_t>self.computed)
            driver.stream_destroy(<uintptr_t>self.copies)
            driver.stream_destroy(<uintptr_t>self.kernels)
