/* pyqemu-dm's stand-in in C: the process the toolstack execs, when a
 * pyxenfb-zygote runs (docs/zygote.md).
 *
 * Built as pyxenfb/bin/pyqemu-dm (hatch_build.py).  Two ways in:
 *   pyqemu-dm ARGV...                 the whole launcher: hand argv, environment,
 *                                     cwd, umask, rlimits and fds to the zygote,
 *                                     then stand in for its child; no zygote ->
 *                                     exec `python3 -m pyxenfb.machine.cli ARGV` (cold)
 *   pyqemu-dm --forward FD PID PREFIX -- ARGV...
 *                                     the last form of the Python launcher's
 *                                     stand-in (standin.py re-execs into it)
 *
 * Why C: a stand-in lives as long as its domain, one per domain.  A bare
 * CPython is ~3.5 MiB private and, in an emulated dom0, most of a second to
 * start before it can even ask the zygote; this is ~0.3 MiB and a few ms.
 *
 * The wire is wire.py's (one fixed binary layout per SOCK_SEQPACKET
 * message, host byte order, strings as raw NUL-terminated bytes): this file
 * writes the REQUEST byte for byte as the Python stand-in does, reads PID /
 * ERROR and EXIT, writes GO and SIGNAL.  The constants below are checked
 * against wire.py and standin.py by the tests.  Everything read from the
 * socket is bounded and validated: a bad answer is a cold start, a bad
 * message later is logged and ignored.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* wire.py */
#define WIRE_MAGIC "PXZG"
#define PROTOCOL 2
#define KIND_REQUEST 1
#define KIND_ERROR 2
#define KIND_PID 3
#define KIND_GO 4
#define KIND_SIGNAL 5
#define KIND_EXIT 6
#define HEADER_SIZE 8
#define REQUEST_FIXED_SIZE 24
#define RLIMIT_SIZE 16
#define SMALL_SIZE 12
#define ENV_SOCKET "PYXENFB_ZYGOTE"
#define ENV_PYTHON "PYXENFB_PYTHON"
#define DEFAULT_SOCKET "/var/run/xen/pyxenfb-zygote.sock"
#define ANSWER_TIMEOUT_MS 2000
#define MAX_REQUEST (128 * 1024)
#define MAX_MESSAGE 4096
#define MAX_FDS 16
#define MAX_FD_NUMBER 1023
#define MAX_ARGS 4096
#define PROG "pyqemu-dm"

/* The cold start's interpreter: $PYXENFB_PYTHON, else -DPYTHON=... given at
 * build time (scripts/setup, the Debian package), else the interpreter of the
 * venv this binary is installed in (a wheel's build can't know it: pipx),
 * else python3 from PATH. */
#ifdef PYTHON
#define PYTHON_BUILT_IN 1
#else
#define PYTHON_BUILT_IN 0
#define PYTHON "python3"
#endif

extern char **environ;

static const int forwarded[] = {SIGTERM, SIGINT, SIGHUP};
static char prefix[64] = PROG;

static void say(const char *fmt, ...)
{
    char line[1024];
    va_list ap;
    int n = snprintf(line, sizeof line, "%s: ", prefix);
    va_start(ap, fmt);
    vsnprintf(line + n, sizeof line - n - 1, fmt, ap);
    va_end(ap);
    strcat(line, "\n");
    if (write(2, line, strlen(line)) < 0) {
        /* nowhere left to say it */
    }
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* ---- the wire (wire.py) --------------------------------------------------------- */

/* A bounded byte buffer: `full` once anything did not fit. */
struct buf { unsigned char *data; size_t len, cap; int full; };

static void put(struct buf *b, const void *s, size_t n)
{
    if (b->full || n > b->cap - b->len) {
        b->full = 1;
        return;
    }
    memcpy(b->data + b->len, s, n);
    b->len += n;
}

static void put_u32(struct buf *b, uint32_t v) { put(b, &v, sizeof v); }
static void put_i32(struct buf *b, int32_t v) { put(b, &v, sizeof v); }
static void put_i64(struct buf *b, int64_t v) { put(b, &v, sizeof v); }
static void put_header(struct buf *b, uint16_t kind)
{
    uint16_t version = PROTOCOL;
    put(b, WIRE_MAGIC, 4);
    put(b, &version, sizeof version);
    put(b, &kind, sizeof kind);
}

/* A whole message of one 32-bit number (PID, SIGNAL, EXIT). */
static size_t small_message(unsigned char *out, uint16_t kind, int32_t value)
{
    struct buf b = {out, 0, SMALL_SIZE, 0};
    put_header(&b, kind);
    put_i32(&b, value);
    return b.len;
}

/* The kind of a message with this format's header, else -1. */
static int message_kind(const unsigned char *m, size_t n)
{
    uint16_t version, kind;
    if (n < HEADER_SIZE || memcmp(m, WIRE_MAGIC, 4))
        return -1;
    memcpy(&version, m + 4, 2);
    memcpy(&kind, m + 6, 2);
    return version == PROTOCOL ? kind : -1;
}

/* The number of a PID / SIGNAL / EXIT message of `kind`, if it is one. */
static int small_value(const unsigned char *m, size_t n, int kind, int32_t *value)
{
    if (n != SMALL_SIZE || message_kind(m, n) != kind)
        return 0;
    memcpy(value, m + HEADER_SIZE, sizeof *value);
    return 1;
}

/* EXIT's status (0..255), as wire.exit_code; else -1. */
static int exit_code(const unsigned char *m, size_t n)
{
    int32_t code;
    return small_value(m, n, KIND_EXIT, &code) && code >= 0 && code <= 255 ? code : -1;
}

/* Up to 40 bytes as Python writes a bytes object: b'...' */
static void bytes_repr(const unsigned char *data, size_t len, char *out, size_t outlen)
{
    size_t o = 0;
    out[o++] = 'b';
    out[o++] = '\'';
    for (size_t i = 0; i < len && i < 40 && o + 6 < outlen; i++) {
        unsigned char c = (unsigned char)data[i];
        if (c == '\\' || c == '\'') { out[o++] = '\\'; out[o++] = (char)c; }
        else if (c == '\n') { out[o++] = '\\'; out[o++] = 'n'; }
        else if (c == '\r') { out[o++] = '\\'; out[o++] = 'r'; }
        else if (c == '\t') { out[o++] = '\\'; out[o++] = 't'; }
        else if (c >= 0x20 && c < 0x7F) out[o++] = (char)c;
        else o += (size_t)snprintf(out + o, outlen - o, "\\x%02x", c);
    }
    out[o++] = '\'';
    out[o] = 0;
}

/* ---- the stand-in's last form: forward signals, wait for the exit status ----------- */

static int forward(int fd, long pid)
{
    sigset_t mask;
    sigemptyset(&mask);
    for (size_t i = 0; i < sizeof forwarded / sizeof *forwarded; i++)
        sigaddset(&mask, forwarded[i]);
    sigprocmask(SIG_BLOCK, &mask, NULL);  /* delivered through sfd from here on */
    int sfd = signalfd(-1, &mask, SFD_CLOEXEC);
    if (sfd < 0) {
        say("signalfd: %s", strerror(errno));
        return 1;
    }
    for (;;) {
        struct pollfd fds[2] = {{.fd = fd, .events = POLLIN}, {.fd = sfd, .events = POLLIN}};
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR) continue;
            say("poll: %s", strerror(errno));
            return 1;
        }
        if (fds[1].revents & POLLIN) {
            struct signalfd_siginfo info;
            if (read(sfd, &info, sizeof info) == sizeof info) {
                unsigned char message[SMALL_SIZE];
                size_t n = small_message(message, KIND_SIGNAL, (int32_t)info.ssi_signo);
                if (send(fd, message, n, MSG_NOSIGNAL) < 0) {
                    /* the child is gone: the end of its socket says so below */
                }
            }
        }
        if (fds[0].revents) {
            unsigned char message[MAX_MESSAGE + 1];
            ssize_t n = recv(fd, message, sizeof message, MSG_TRUNC | MSG_DONTWAIT);
            if (n < 0 && (errno == EAGAIN || errno == EINTR))
                continue;
            if (n <= 0) {
                say("device model pid %ld died without an exit status (killed by a signal?)", pid);
                return 1;
            }
            size_t got = (size_t)n < sizeof message ? (size_t)n : sizeof message;
            int code = (size_t)n <= MAX_MESSAGE ? exit_code(message, got) : -1;
            if (code >= 0)
                return code;
            char shown[256];
            bytes_repr(message, got, shown, sizeof shown);
            say("zygote child %ld: bad message %s; ignored", pid, shown);
        }
    }
}

/* ---- the launcher -------------------------------------------------------------- */

/* "pyqemu-dm[N]" for -d N / -xen-domid N, as launch.log_prefix. */
static void set_prefix(int argc, char **argv)
{
    static const char *flags[] = {"-d", "-xen-domid"};
    for (int f = 0; f < 2; f++) {
        for (int i = 1; i < argc - 1; i++) {
            if (strcmp(argv[i], flags[f]))
                continue;
            const char *v = argv[i + 1];
            if (!*v || strspn(v, "0123456789") != strlen(v))
                break;                    /* as Python: only the first such flag counts */
            while (v[0] == '0' && v[1]) v++;
            snprintf(prefix, sizeof prefix, "%s[%.40s]", PROG, v);
            return;
        }
    }
}

/* 0, 1, 2 where open and every `fd=N` in a comma-separated argument, each
 * once, as standin._fds_to_pass: whether a number is passed depends on the
 * number alone, so checking it again when it recurs gives the same answer. */
static int consider_fd(long fd, int *out, int n)
{
    struct stat st;
    if (n >= MAX_FDS || fd > MAX_FD_NUMBER || fstat((int)fd, &st) < 0)
        return n;
    for (int j = 0; j < n; j++)
        if (out[j] == fd)
            return n;
    out[n] = (int)fd;
    return n + 1;
}

static int fds_to_pass(int argc, char **argv, int *out)
{
    int n = 0;
    for (long fd = 0; fd < 3; fd++)
        n = consider_fd(fd, out, n);
    for (int i = 1; i < argc; i++) {
        for (const char *part = argv[i]; part; ) {
            const char *end = strchr(part, ',');
            size_t len = end ? (size_t)(end - part) : strlen(part);
            if (len > 3 && !strncmp(part, "fd=", 3) && strspn(part + 3, "0123456789") >= len - 3) {
                long v = 0;
                for (size_t d = 3; d < len && v <= MAX_FD_NUMBER; d++)
                    v = v * 10 + (part[d] - '0');
                n = consider_fd(v, out, n);
            }
            part = end ? end + 1 : NULL;
        }
    }
    return n;
}

static const struct { const char *name; int resource; } rlimits[] = {
    {"AS", RLIMIT_AS}, {"CORE", RLIMIT_CORE}, {"CPU", RLIMIT_CPU}, {"DATA", RLIMIT_DATA},
    {"FSIZE", RLIMIT_FSIZE}, {"LOCKS", RLIMIT_LOCKS}, {"MEMLOCK", RLIMIT_MEMLOCK},
    {"MSGQUEUE", RLIMIT_MSGQUEUE}, {"NICE", RLIMIT_NICE}, {"NOFILE", RLIMIT_NOFILE},
    {"NPROC", RLIMIT_NPROC}, {"RSS", RLIMIT_RSS}, {"RTPRIO", RLIMIT_RTPRIO},
    {"RTTIME", RLIMIT_RTTIME}, {"SIGPENDING", RLIMIT_SIGPENDING}, {"STACK", RLIMIT_STACK},
};

static int64_t limit_value(rlim_t v)
{
    return v == RLIM_INFINITY ? -1 : (int64_t)v;
}

/* The request, as standin._handshake builds it (wire.encode_request); NULL
 * with *why if it can't be. */
static struct buf *build_request(int argc, char **argv, const int *fds, int nfds, const char **why)
{
    static unsigned char data[MAX_REQUEST];
    static struct buf b = {data, 0, sizeof data, 0};
    static char cwd[PATH_MAX];
    if (!getcwd(cwd, sizeof cwd)) {
        *why = "cannot read the working directory";
        return NULL;
    }
    /* The environment as os.environb has it: entries with a name and '=',
     * the first of a name winning; counted before the fixed part is written. */
    static char *env[MAX_REQUEST / 2];
    uint32_t envc = 0;
    for (char **e = environ; *e && envc < sizeof env / sizeof *env; e++) {
        const char *eq = strchr(*e, '=');
        if (!eq || eq == *e)
            continue;
        size_t keylen = (size_t)(eq - *e);
        int duplicate = 0;
        for (uint32_t f = 0; f < envc && !duplicate; f++)
            duplicate = !strncmp(env[f], *e, keylen + 1);
        if (!duplicate)
            env[envc++] = *e;
    }
    size_t strings = strlen(cwd) + 1;
    for (int i = 0; i < argc; i++)
        strings += strlen(argv[i]) + 1;
    for (uint32_t i = 0; i < envc; i++)
        strings += strlen(env[i]) + 1;
    mode_t mask = umask(022);
    umask(mask);
    struct rlimit limits[sizeof rlimits / sizeof *rlimits];
    uint32_t present = 0;
    for (size_t i = 0; i < sizeof rlimits / sizeof *rlimits; i++) {
        if (getrlimit(rlimits[i].resource, &limits[i]) == 0)
            present |= 1u << i;
    }
    put_header(&b, KIND_REQUEST);
    put_u32(&b, (uint32_t)argc);
    put_u32(&b, envc);
    put_u32(&b, (uint32_t)nfds);
    put_u32(&b, (uint32_t)mask);
    put_u32(&b, present);
    put_u32(&b, strings > UINT32_MAX ? UINT32_MAX : (uint32_t)strings);
    for (size_t i = 0; i < sizeof rlimits / sizeof *rlimits; i++) {
        uint32_t on = present & (1u << i);
        put_i64(&b, on ? limit_value(limits[i].rlim_cur) : 0);
        put_i64(&b, on ? limit_value(limits[i].rlim_max) : 0);
    }
    for (int i = 0; i < nfds; i++)
        put_i32(&b, fds[i]);
    put(&b, cwd, strlen(cwd) + 1);
    for (int i = 0; i < argc; i++)
        put(&b, argv[i], strlen(argv[i]) + 1);
    for (uint32_t i = 0; i < envc; i++)
        put(&b, env[i], strlen(env[i]) + 1);
    if (b.full) {
        static char too_long[64];
        snprintf(too_long, sizeof too_long, "request exceeds %d bytes", MAX_REQUEST);
        *why = too_long;
        return NULL;
    }
    return &b;
}

static double seconds_since_exec(void)
{
    char stat[1024], up[64];
    int fd = open("/proc/self/stat", O_RDONLY | O_CLOEXEC);
    ssize_t n = fd < 0 ? -1 : read(fd, stat, sizeof stat - 1);
    if (fd >= 0) close(fd);
    fd = open("/proc/uptime", O_RDONLY | O_CLOEXEC);
    ssize_t m = fd < 0 ? -1 : read(fd, up, sizeof up - 1);
    if (fd >= 0) close(fd);
    if (n <= 0 || m <= 0)
        return -1;
    stat[n] = up[m] = 0;
    char *p = strrchr(stat, ')');
    if (!p) return -1;
    unsigned long long start = 0;
    /* after ")": state is field 3; starttime is field 22 */
    for (int field = 3; field <= 22 && p; field++) {
        p = strchr(p + 1, ' ');
        if (p && field == 22) start = strtoull(p + 1, NULL, 10);
    }
    double since = strtod(up, NULL) - (double)start / sysconf(_SC_CLK_TCK);
    return since > 0 ? since : 0;
}

enum { COLD_QUIET = -2, COLD = -1 };

/* Connect, send the request with the fds (fds/nfds: those passed), read the
 * child's pid, commit.  Returns the connected socket (*pid set), or COLD /
 * COLD_QUIET with a line said. */
static int handshake(const char *path, int explicit_path, int argc, char **argv, long *pid,
                     int *fds, int *nfds_out)
{
    double started = now();
    double deadline = started + ANSWER_TIMEOUT_MS / 1000.0;
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path) {
        say("zygote: socket path %.60s... too long; cold start", path);
        return COLD;
    }
    strcpy(addr.sun_path, path);
    int sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (sock < 0) {
        say("zygote: socket: %s; cold start", strerror(errno));
        return COLD;
    }
    /* Both bound connect() (a full backlog) and the answer. */
    struct timeval tv = {ANSWER_TIMEOUT_MS / 1000, (ANSWER_TIMEOUT_MS % 1000) * 1000};
    setsockopt(sock, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (connect(sock, (struct sockaddr *)&addr, sizeof addr) < 0) {
        int e = errno;
        close(sock);
        if (e == ENOENT) {
            if (!explicit_path) return COLD_QUIET;       /* no zygote installed: silently cold */
            say("zygote: no zygote at %s; cold start", path);
        } else if (e == EAGAIN || e == ETIMEDOUT) {
            say("zygote: %s did not accept within 2 s; cold start", path);
        } else {
            say("zygote: cannot connect to %s: %s; cold start", path, strerror(e));
        }
        return COLD;
    }
    int nfds = *nfds_out = fds_to_pass(argc, argv, fds);
    const char *why = NULL;
    struct buf *request = build_request(argc, argv, fds, nfds, &why);
    if (!request) {
        say("zygote: %s; cold start", why);
        close(sock);
        return COLD;
    }
    char control[CMSG_SPACE(sizeof(int) * MAX_FDS)];
    memset(control, 0, sizeof control);
    struct iovec iov = {request->data, request->len};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    if (nfds) {
        msg.msg_control = control;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
    }
    if (sendmsg(sock, &msg, MSG_NOSIGNAL) < 0) {
        say("zygote: %s: bad answer: %s; cold start", path, strerror(errno));
        close(sock);
        return COLD;
    }
    double left = deadline - now();
    if (left < 0.01) left = 0.01;
    tv.tv_sec = (time_t)left;
    tv.tv_usec = (suseconds_t)((left - (double)tv.tv_sec) * 1e6);
    setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    unsigned char reply[MAX_MESSAGE + 1];
    ssize_t n;
    do {
        n = recv(sock, reply, sizeof reply, MSG_TRUNC);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            say("zygote: %s did not answer within 2 s; cold start", path);
        else
            say("zygote: %s: bad answer: %s; cold start", path, strerror(errno));
        close(sock);
        return COLD;
    }
    if (n == 0) {
        say("zygote: %s closed the connection without an answer; cold start", path);
        close(sock);
        return COLD;
    }
    if (n > MAX_MESSAGE) {
        say("zygote: %s: bad answer: message longer than %d bytes; cold start", path, MAX_MESSAGE);
        close(sock);
        return COLD;
    }
    uint32_t length;
    if (message_kind(reply, (size_t)n) == KIND_ERROR && n >= SMALL_SIZE
            && (memcpy(&length, reply + HEADER_SIZE, 4), length == (size_t)n - SMALL_SIZE)) {
        /* one line of at most 200 characters: printable ASCII kept, any other
         * character (a UTF-8 sequence: its lead byte) as '?' */
        char error[201];
        size_t o = 0;
        for (size_t i = SMALL_SIZE; i < (size_t)n && o < sizeof error - 1; i++) {
            unsigned char c = reply[i];
            if (c >= 0x80 && c < 0xC0)
                continue;
            error[o++] = c >= 0x20 && c < 0x7F ? (char)c : '?';
        }
        error[o] = 0;
        say("zygote: %s refused: %s; cold start", path, error);
        close(sock);
        return COLD;
    }
    int32_t value;
    if (!small_value(reply, (size_t)n, KIND_PID, &value) || value <= 1) {
        char shown[256];
        bytes_repr(reply, (size_t)n, shown, sizeof shown);
        say("zygote: %s: bad answer %s; cold start", path, shown);
        close(sock);
        return COLD;
    }
    /* Said before GO: the child writes to the same log only once it has GO,
     * so the hand-over line always comes first there. */
    double since = seconds_since_exec();
    char after[64] = "";
    if (since >= 0)
        snprintf(after, sizeof after, " (%.0f ms after exec)", since * 1000);
    say("zygote %s forked the device model as pid %d in %.0f ms%s; pid %d stands in for it",
        path, (int)value, (now() - started) * 1000, after, (int)getpid());
    unsigned char go[HEADER_SIZE];
    struct buf gob = {go, 0, sizeof go, 0};
    put_header(&gob, KIND_GO);
    if (send(sock, go, gob.len, MSG_NOSIGNAL) < 0) {
        say("zygote: %s: child %d went away: %s; cold start", path, (int)value, strerror(errno));
        close(sock);
        return COLD;
    }
    struct timeval none = {0, 0};
    setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &none, sizeof none);
    *pid = (long)value;
    return sock;
}

/* VENV/bin/python when this binary is VENV/lib[64]/pythonX.Y/site-packages/
 * pyxenfb/bin/pyqemu-dm and VENV/pyvenv.cfg exists; else 0. */
static int own_venv_python(char *out, size_t size)
{
    char path[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", path, sizeof path - 1);
    if (n <= 0)
        return 0;
    path[n] = 0;
    static const char *const expect[] = {"pyqemu-dm", "bin", "pyxenfb", "site-packages", "python", "lib"};
    for (size_t i = 0; i < sizeof expect / sizeof *expect; i++) {
        char *slash = strrchr(path, '/');
        if (!slash || slash == path)
            return 0;
        const char *base = slash + 1;
        int ok = i == 4 ? !strncmp(base, "python", 6)
                 : i == 5 ? !strcmp(base, "lib") || !strcmp(base, "lib64")
                 : !strcmp(base, expect[i]);
        if (!ok)
            return 0;
        *slash = 0;
    }
    char cfg[PATH_MAX + 16];
    snprintf(cfg, sizeof cfg, "%s/pyvenv.cfg", path);
    if ((size_t)snprintf(out, size, "%s/bin/python", path) >= size)
        return 0;
    return access(cfg, R_OK) == 0 && access(out, X_OK) == 0;
}

static int cold_start(int argc, char **argv, const sigset_t *original)
{
    sigprocmask(SIG_SETMASK, original, NULL);
    const char *python = getenv(ENV_PYTHON);
    static char own[PATH_MAX];
    if ((!python || !*python) && !PYTHON_BUILT_IN && own_venv_python(own, sizeof own))
        python = own;
    if (!python || !*python)
        python = PYTHON;
    /* `python3 -m pyxenfb.machine.cli` runs the package this binary was built into:
     * its parent directory goes first on PYTHONPATH, unless it is an
     * interpreter's own site directory (there already, and above the stdlib
     * it must not be). */
    char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n > 0) {
        self[n] = 0;
        for (int up = 0; up < 2; up++) {          /* .../ROOT/pyxenfb/bin/pyqemu-dm -> .../ROOT */
            char *slash = strrchr(self, '/');
            if (slash) *slash = 0;
        }
        char *slash = strrchr(self, '/');
        if (slash && slash != self) {
            *slash = 0;
            const char *base = strrchr(self, '/') ? strrchr(self, '/') + 1 : self;
            if (strcmp(base, "site-packages") && strcmp(base, "dist-packages")) {
                const char *old = getenv("PYTHONPATH");
                char path[2 * PATH_MAX + 2];
                snprintf(path, sizeof path, "%s%s%s", self, old && *old ? ":" : "", old ? old : "");
                setenv("PYTHONPATH", path, 1);
            }
        }
    }
    char **args = calloc((size_t)argc + 4, sizeof *args);
    if (!args) {
        say("out of memory");
        return 1;
    }
    args[0] = (char *)python;
    args[1] = "-m";
    args[2] = "pyxenfb.machine.cli";
    for (int i = 1; i < argc; i++)
        args[i + 2] = argv[i];
    execvp(python, args);
    say("cannot start %s for a cold start: %s", python, strerror(errno));
    return 1;
}

int main(int argc, char **argv)
{
    /* As Python has it (and hands on to the cold start): a reader of the log
     * gone must not kill the stand-in, and with it the domain's DM. */
    signal(SIGPIPE, SIG_IGN);
    if (argc >= 5 && !strcmp(argv[1], "--forward")) {
        /* FD PID PREFIX -- ARGV: the Python stand-in's re-exec */
        snprintf(prefix, sizeof prefix, "%s", argv[4]);
        char *end;
        long fd = strtol(argv[2], &end, 10);
        if (*end || fd < 0 || fd > INT_MAX) {
            say("--forward: bad fd %s", argv[2]);
            return 2;
        }
        fcntl((int)fd, F_SETFD, FD_CLOEXEC);
        return forward((int)fd, strtol(argv[3], NULL, 10));
    }
    set_prefix(argc, argv);
    /* Held from the start: a SIGTERM during the hand-over is forwarded once
     * the child is committed, or reaches the cold start as it would have. */
    sigset_t mask, original;
    sigemptyset(&mask);
    for (size_t i = 0; i < sizeof forwarded / sizeof *forwarded; i++)
        sigaddset(&mask, forwarded[i]);
    sigprocmask(SIG_BLOCK, &mask, &original);

    const char *setting = getenv(ENV_SOCKET);
    if (setting && !strcmp(setting, "off"))
        return cold_start(argc, argv, &original);
    const char *path = setting && *setting ? setting : DEFAULT_SOCKET;
    long pid = 0;
    int fds[MAX_FDS], nfds = 0;
    int sock = handshake(path, setting && *setting, argc, argv, &pid, fds, &nfds);
    if (sock < 0)
        return cold_start(argc, argv, &original);
    for (int i = 0; i < nfds; i++)
        if (fds[i] > 2)
            close(fds[i]);                /* the child's QMP socket: not ours to hold open */
    return forward(sock, pid);
}
