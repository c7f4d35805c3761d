# The waits of sampling's watcher thread (sampling.py: a waiting first item spills the next
# items onto threads): until a caller posts its first item, then until that item returns or
# its thread has stayed off the CPU long enough to look blocked. All without the GIL.
#
# Why compiled. The watcher was a Python thread: each sample woke it, and it took the GIL
# from the caller, who was still sampling; that cost ~4 % of the CPU time of a 10 ms run
# of 0.1 us items (benchmarks/bench_serial.py --cpu: execute / list comprehension, with
# and without the wake-up). Here the watcher runs no Python until an item has looked
# blocked.
#
# Why an alarm. Where there is a timerfd (Linux), a post arms it for ``after`` seconds and
# end() disarms it: a quick item wakes nobody. A wake-up per post put the watcher's CPU in
# the process's address space, and from then on every munmap the caller made (freeing a
# large list) sent that CPU a TLB-flush IPI, an exit to the hypervisor on a VM: ~70 us of
# each execute() of 200k tiny items (perf record -e cpu-clock, benchmarks/bench_serial.py's
# loop). Elsewhere a post releases a lock the watcher waits on.
#
#   caller:  post(watched, clock) ── item runs ── end()
#   watcher: WatchBoard.wait(...) ─ nogil ─▶ returns only when the posted item waited
#            ``checks`` times in a row (the caller's thread CPU clock and /proc state, read
#            ``after`` seconds after the post, then at doubling intervals): then Python
#            spills.

cdef extern from *:
    """
    #if defined(__linux__)
    #include <errno.h>
    #include <stdint.h>
    #include <string.h>
    #include <sys/timerfd.h>
    #include <unistd.h>
    /* A one-shot alarm the watcher blocks on (-1: none here, or none could be made). */
    static int amz_alarm_new(void) { return timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC); }
    /* Ring in `seconds` (0: never, disarmed). */
    static void amz_alarm_set(int fd, double seconds) {
        struct itimerspec its;
        memset(&its, 0, sizeof its);
        if (seconds > 0.0) {
            its.it_value.tv_sec = (time_t)seconds;
            its.it_value.tv_nsec = (long)((seconds - (double)its.it_value.tv_sec) * 1e9);
            if (its.it_value.tv_sec == 0 && its.it_value.tv_nsec == 0) its.it_value.tv_nsec = 1;
        }
        (void)timerfd_settime(fd, 0, &its, NULL);
    }
    /* Block until the alarm rings: 0, or -1 if it cannot be read. */
    static int amz_alarm_wait(int fd) {
        uint64_t rings;
        ssize_t n;
        do { n = read(fd, &rings, sizeof rings); } while (n < 0 && errno == EINTR);
        return n == (ssize_t)sizeof rings ? 0 : -1;
    }
    static void amz_alarm_close(int fd) { (void)close(fd); }
    #else
    static int amz_alarm_new(void) { return -1; }
    static void amz_alarm_set(int fd, double seconds) { (void)fd; (void)seconds; }
    static int amz_alarm_wait(int fd) { (void)fd; return -1; }
    static void amz_alarm_close(int fd) { (void)fd; }
    #endif
    /* A clock's seconds, -1 if it cannot be read. Windows has no thread CPU clock id (and
       no watcher: sampling never posts there), so there every read fails. */
    #if defined(_WIN32)
    typedef long amz_clockid_t;
    static double amz_clock_seconds(amz_clockid_t clock) { (void)clock; return -1.0; }
    static double amz_monotonic_seconds(void) { return -1.0; }
    static int amz_thread_blocked(long tid) { (void)tid; return -1; }
    #else
    #include <fcntl.h>
    #include <stdio.h>
    #include <string.h>
    #include <time.h>
    #include <unistd.h>
    typedef clockid_t amz_clockid_t;
    static double amz_clock_seconds(amz_clockid_t clock) {
        struct timespec ts;
        if (clock_gettime(clock, &ts) != 0) return -1.0;
        return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
    }
    static double amz_monotonic_seconds(void) { return amz_clock_seconds(CLOCK_MONOTONIC); }
    /* Whether thread `tid` of this process is blocked now (state S or D in /proc: not
       running, nor runnable and preempted): 1, 0, or -1 where /proc cannot tell. */
    static int amz_thread_blocked(long tid) {
        char path[64], buf[512];
        ssize_t n;
        char *end;
        int fd;
        snprintf(path, sizeof path, "/proc/self/task/%ld/stat", tid);
        fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) return -1;
        n = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (n <= 0) return -1;
        buf[n] = 0;
        end = strrchr(buf, ')');
        if (end == NULL || end[1] != ' ') return -1;
        return end[2] == 'S' || end[2] == 'D';
    }
    #endif
    """
    ctypedef long amz_clockid_t
    double amz_clock_seconds(amz_clockid_t clock) noexcept nogil
    double amz_monotonic_seconds() noexcept nogil
    int amz_alarm_new() noexcept nogil
    void amz_alarm_set(int fd, double seconds) noexcept nogil
    int amz_alarm_wait(int fd) noexcept nogil
    void amz_alarm_close(int fd) noexcept nogil
    int amz_thread_blocked(long tid) noexcept nogil

cdef extern from "pythread.h":
    # CPython's own locks (what threading.Lock wraps): usable without the GIL.
    ctypedef void* PyThread_type_lock
    ctypedef enum PyLockStatus:
        PY_LOCK_FAILURE
        PY_LOCK_ACQUIRED
        PY_LOCK_INTR
    PyThread_type_lock PyThread_allocate_lock()
    void PyThread_free_lock(PyThread_type_lock lock)
    int PyThread_acquire_lock(PyThread_type_lock lock, int waitflag) nogil
    PyLockStatus PyThread_acquire_lock_timed(
        PyThread_type_lock lock, long long microseconds, int intr_flag) nogil
    void PyThread_release_lock(PyThread_type_lock lock) nogil
    int WAIT_LOCK
    int NOWAIT_LOCK


@cython.final
@cython.auto_pickle(False)
cdef class WatchBoard:
    """Where a caller posts its first sampled item for the process's one watcher thread.

    ``post(watched, clock, tid)`` (the caller's thread CPU clock id and native thread id)
    returns False when another caller's item is being watched (the item then runs
    unwatched); ``end()`` tells that the item returned. The watcher calls ``wait`` in a
    loop.

    >>> board = WatchBoard()
    >>> board.post("item", 0, 0), board.post("other", 0, 0)
    (True, False)
    >>> board.end()
    """

    cdef PyThread_type_lock posted  # released by post: the watcher's wake-up (no alarm)
    cdef PyThread_type_lock running  # held while a posted item runs; released by end
    cdef PyThread_type_lock mutex  # guards the fields below between the two threads
    cdef int alarm  # armed by post, disarmed by end: the watcher's wake-up (-1: none)
    cdef double after  # ``wait``'s: how long after a post the alarm rings
    cdef amz_clockid_t clock
    cdef long tid
    cdef double cpu0, t0  # the posting thread's CPU clock and the time, at the post
    cdef bint busy  # an item is posted and not ended
    cdef bint pending  # ``posted`` is released and the watcher has not taken it yet
    cdef readonly long long generation  # counts posts
    cdef readonly object watched  # what the caller posted (read by the watcher's Python)

    def __cinit__(self) -> None:
        self.posted = PyThread_allocate_lock()
        self.running = PyThread_allocate_lock()
        self.mutex = PyThread_allocate_lock()
        if self.posted == NULL or self.running == NULL or self.mutex == NULL:
            raise MemoryError("cannot allocate the watcher's locks")
        PyThread_acquire_lock(self.posted, WAIT_LOCK)
        PyThread_acquire_lock(self.running, WAIT_LOCK)
        self.generation = 0
        self.watched = None
        self.alarm = amz_alarm_new()
        self.after = 0.0

    def __dealloc__(self) -> None:
        if self.alarm >= 0:
            amz_alarm_close(self.alarm)
        if self.posted != NULL:
            PyThread_free_lock(self.posted)
        if self.running != NULL:
            PyThread_free_lock(self.running)
        if self.mutex != NULL:
            PyThread_free_lock(self.mutex)

    def post(self, object watched, long clock, long tid) -> bool:
        """Watch the caller's item from now on (False: the board is busy)."""
        cdef double cpu0 = amz_clock_seconds(<amz_clockid_t>clock)
        cdef bint wake = False
        PyThread_acquire_lock(self.mutex, WAIT_LOCK)
        if self.busy:
            PyThread_release_lock(self.mutex)
            return False
        self.busy = True
        self.clock = <amz_clockid_t>clock
        self.tid = tid
        self.cpu0, self.t0 = cpu0, amz_monotonic_seconds()
        self.generation += 1
        self.watched = watched
        # Held while the item runs (the watcher may have left it released: an item it gave
        # up on ended after that).
        PyThread_acquire_lock(self.running, NOWAIT_LOCK)
        if self.alarm >= 0:
            # Under the mutex: another caller's end() must not disarm this post's alarm.
            # Before the watcher's first wait, ring at once: it looks when it gets there.
            amz_alarm_set(self.alarm, self.after if self.after > 0.0 else 1e-9)
        else:
            wake = not self.pending
            self.pending = True
        PyThread_release_lock(self.mutex)
        if wake:  # a post the watcher has not taken yet wakes it already
            PyThread_release_lock(self.posted)
        return True

    def end(self) -> None:
        """The posted item returned: stop watching it."""
        PyThread_acquire_lock(self.mutex, WAIT_LOCK)
        if self.busy:
            self.busy = False
            self.watched = None
            if self.alarm >= 0:
                amz_alarm_set(self.alarm, 0.0)
            PyThread_release_lock(self.running)
        PyThread_release_lock(self.mutex)

    def current(self, long long generation) -> object:
        """What post ``generation`` posted, if it is still running; else None."""
        return self.watched if self.busy and generation == self.generation else None

    def wait(self, double after, double max_cpu, int checks) -> int:
        """Block (without the GIL) until a posted item has waited for ``checks`` checks in
        a row, the first ``after`` seconds into it (each check that finds it busy doubles
        the interval); return that post's ``generation``. Waited: its thread used under
        ``max_cpu`` of a core since the last check and is blocked now (sleep, I/O, a lock;
        not runnable and preempted, where /proc can tell). Items that return first are
        skipped. Called by the watcher thread only."""
        cdef long long generation = 0
        with nogil:
            PyThread_acquire_lock(self.mutex, WAIT_LOCK)
            self.after = after
            PyThread_release_lock(self.mutex)
            while generation == 0:
                if self.alarm < 0:
                    PyThread_acquire_lock(self.posted, WAIT_LOCK)
                elif amz_alarm_wait(self.alarm) != 0:
                    # Unreadable (never seen): look every ``after`` rather than spin.
                    PyThread_acquire_lock_timed(self.posted, <long long>(after * 1e6), 0)
                generation = self._watch(after, max_cpu, checks)
        return generation

    cdef long long _watch(self, double after, double max_cpu, int checks) noexcept nogil:
        # The item posted last: its generation once it waited, 0 once it returned. Its state
        # is read here, not after taking the GIL: a CPU-bound item's thread waits for the
        # GIL the watcher takes, and would read as blocked. The first look comes ``after``
        # seconds after the post (an alarm rings then: no wait is left).
        cdef double interval = after, pause, cpu0, t0, cpu, now
        cdef int streak = 0
        cdef long long generation
        cdef amz_clockid_t clock
        cdef long tid
        cdef bint ended
        PyThread_acquire_lock(self.mutex, WAIT_LOCK)
        self.pending = False  # this wake-up took the post
        generation, clock, tid = self.generation, self.clock, self.tid
        cpu0, t0 = self.cpu0, self.t0
        if not self.busy:
            generation = 0  # it returned already
        PyThread_release_lock(self.mutex)
        if generation == 0:
            return 0
        pause = max(after - (amz_monotonic_seconds() - t0), 0.0)
        while True:
            if PyThread_acquire_lock_timed(
                self.running, <long long>(pause * 1e6), 0
            ) == PY_LOCK_ACQUIRED:
                return 0  # it returned (``running`` is held again, as a post wants it)
            PyThread_acquire_lock(self.mutex, WAIT_LOCK)
            ended = not self.busy or self.generation != generation
            PyThread_release_lock(self.mutex)
            if ended:  # it returned and the same thread posted the next item meanwhile
                return 0
            cpu, now = amz_clock_seconds(clock), amz_monotonic_seconds()
            if cpu < 0.0:
                streak = 0  # the thread's clock is gone: the item cannot be told apart
            elif cpu - cpu0 < max_cpu * (now - t0) and amz_thread_blocked(tid) != 0:
                streak += 1
            else:
                streak = 0
            cpu0, t0 = cpu, now
            if streak >= checks:
                return generation
            if streak == 0:
                interval *= 2.0
            pause = interval
