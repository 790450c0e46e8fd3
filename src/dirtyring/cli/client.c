/*
 * dirtyring-client: run a dirtyring command in a warm server (`dirtyring serve`), without
 * starting Python.
 *
 * Why C (a measured reason, as every C part of the VMM's side has one): a Python client costs
 * the interpreter's start-up before it can connect. Here `python -I -S -c pass` takes ~8 ms,
 * with the modules a client needs ~10 ms, and with the site directory (every command a pip
 * install makes runs with it) ~35 ms. The program's own start in the server's worker is ~9 ms,
 * so only a client that starts in well under a millisecond keeps `run --exec` of a program
 * within 20 ms of the command (issue 15's goal). This one does the least: connect, hand over
 * the arguments, the working directory and the three standard descriptors, forward the signals
 * a shell's foreground job gets, and exit with the status the worker reports.
 *
 * `dirtyring-client ARGS...` does what `dirtyring ARGS...` does. With no server listening, it
 * runs `dirtyring ARGS...` itself (the same command, with Python's start-up).
 * `dirtyring-client --where` prints the socket it uses.
 *
 * The protocol is cli/server.py's (its docstring is the reference; tests check both agree):
 *   request:  "DRW1", u32 length, then length bytes: the working directory and each argument,
 *             each ending in NUL; descriptors 0, 1 and 2 ride along (SCM_RIGHTS).
 *   replies:  u32 kind, u32 value: kind 1 = the worker's pid, 2 = the exit status, 3 = an
 *             error whose text (value bytes) follows.
 * Little-endian throughout (this is x86-64 only, as KVM here is).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define MAGIC "DRW1"
#define MAX_REQUEST (1u << 20)
#define KIND_PID 1u
#define KIND_STATUS 2u
#define KIND_ERROR 3u

static volatile sig_atomic_t worker_pid;
/* Signals that came before the worker's pid did: sent on as soon as it is known. */
static volatile sig_atomic_t early[NSIG];

static void forward(int sig)
{
    if (worker_pid > 0)
        kill((pid_t)worker_pid, sig);
    else
        early[sig] = 1;
}

/* The socket: $DIRTYRING_SOCKET, else $XDG_RUNTIME_DIR/dirtyring/serve.sock, else
 * /tmp/dirtyring-UID/serve.sock (server.default_socket says the same). */
static int socket_path(char *out, size_t n)
{
    const char *env = getenv("DIRTYRING_SOCKET");
    const char *xdg = getenv("XDG_RUNTIME_DIR");
    int len;
    if (env && *env)
        len = snprintf(out, n, "%s", env);
    else if (xdg && *xdg)
        len = snprintf(out, n, "%s/dirtyring/serve.sock", xdg);
    else
        len = snprintf(out, n, "/tmp/dirtyring-%u/serve.sock", (unsigned)getuid());
    return len > 0 && (size_t)len < n ? 0 : -1;
}

static int read_full(int fd, void *buf, size_t n)
{
    char *p = buf;
    while (n) {
        ssize_t r = read(fd, p, n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

static const int sigs[] = {SIGHUP, SIGINT, SIGQUIT, SIGTERM};

/* Without a server: the same command, run the slow way (a signal that came meanwhile acts as
 * it would have without us). */
static int run_cold(char **argv)
{
    for (unsigned i = 0; i < sizeof sigs / sizeof sigs[0]; i++) {
        signal(sigs[i], SIG_DFL);
        if (early[sigs[i]])
            raise(sigs[i]);
    }
    argv[0] = "dirtyring";
    execvp("dirtyring", argv);
    fprintf(stderr, "dirtyring-client: no warm server is listening, and `dirtyring` could not "
                    "be run: %s\n", strerror(errno));
    return 127;
}

int main(int argc, char **argv)
{
    char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
    if (socket_path(path, sizeof path) < 0) {
        fprintf(stderr, "dirtyring-client: the socket path is too long\n");
        return 2;
    }
    if (argc == 2 && strcmp(argv[1], "--where") == 0) {
        printf("%s\n", path);
        return 0;
    }
    /* A standard descriptor we were started without becomes /dev/null for the worker. */
    for (int fd = 0; fd < 3; fd++)
        if (fcntl(fd, F_GETFD) < 0 && open("/dev/null", fd ? O_WRONLY : O_RDONLY) != fd)
            return 2;

    /* Signals a shell's foreground job gets go to the worker, which passes them on as
     * `dirtyring` itself would (to an --exec program, for one); from now on, so none is lost
     * before the worker is known. */
    struct sigaction act = {.sa_handler = forward};
    sigemptyset(&act.sa_mask);
    for (unsigned i = 0; i < sizeof sigs / sizeof sigs[0]; i++)
        sigaction(sigs[i], &act, NULL);

    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    memcpy(sa.sun_path, path, strlen(path) + 1);
    if (s < 0 || connect(s, (struct sockaddr *)&sa, sizeof sa) < 0) {
        if (errno == ENOENT || errno == ECONNREFUSED)
            return run_cold(argv);
        fprintf(stderr, "dirtyring-client: cannot reach the warm server at %s: %s\n", path,
                strerror(errno));
        return 2;
    }

    /* Only a server of our own user gets our descriptors. */
    struct ucred peer;
    socklen_t plen = sizeof peer;
    if (getsockopt(s, SOL_SOCKET, SO_PEERCRED, &peer, &plen) < 0 || peer.uid != getuid()) {
        fprintf(stderr, "dirtyring-client: the server at %s is not yours; not using it\n",
                path);
        return 2;
    }

    static char req[MAX_REQUEST];
    size_t len = 8;
    char cwd[PATH_MAX];
    if (!getcwd(cwd, sizeof cwd)) {
        fprintf(stderr, "dirtyring-client: cannot read the working directory: %s\n",
                strerror(errno));
        return 2;
    }
    for (int i = 0; i < argc; i++) {
        const char *a = i == 0 ? cwd : argv[i];
        size_t n = strlen(a) + 1;
        if (len + n > sizeof req) {
            fprintf(stderr, "dirtyring-client: the arguments exceed %u bytes\n", MAX_REQUEST);
            return 2;
        }
        memcpy(req + len, a, n);
        len += n;
    }
    memcpy(req, MAGIC, 4);
    uint32_t body = (uint32_t)(len - 8);
    memcpy(req + 4, &body, 4);

    int fds[3] = {0, 1, 2};
    char ctl[CMSG_SPACE(sizeof fds)];
    memset(ctl, 0, sizeof ctl);
    struct iovec iov = {.iov_base = req, .iov_len = len};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl,
                         .msg_controllen = sizeof ctl};
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof fds);
    memcpy(CMSG_DATA(c), fds, sizeof fds);
    ssize_t sent = sendmsg(s, &msg, MSG_NOSIGNAL);
    /* The rest (a request over one socket buffer) goes without descriptors. */
    size_t off = sent > 0 ? (size_t)sent : 0;
    while (sent >= 0 && off < len) {
        sent = send(s, req + off, len - off, MSG_NOSIGNAL);
        if (sent < 0 && errno == EINTR) {
            sent = 0;
            continue;
        }
        off += sent > 0 ? (size_t)sent : 0;
    }
    if (sent < 0) {
        fprintf(stderr, "dirtyring-client: the warm server hung up: %s\n", strerror(errno));
        return 2;
    }

    for (;;) {
        uint32_t head[2];
        if (read_full(s, head, sizeof head) < 0) {
            fprintf(stderr, "dirtyring-client: the warm server's worker ended without "
                            "an exit status\n");
            return 1;
        }
        if (head[0] == KIND_PID) {
            sigset_t all, old;
            sigfillset(&all);
            sigprocmask(SIG_BLOCK, &all, &old);     /* no signal between the two steps */
            worker_pid = (sig_atomic_t)head[1];
            for (int sig = 1; sig < NSIG; sig++)
                if (early[sig]) {
                    early[sig] = 0;
                    kill((pid_t)worker_pid, sig);
                }
            sigprocmask(SIG_SETMASK, &old, NULL);
        } else if (head[0] == KIND_STATUS) {
            return (int)(head[1] & 0xFF);
        } else if (head[0] == KIND_ERROR && head[1] < 4096) {
            char text[4096];
            if (read_full(s, text, head[1]) < 0)
                return 2;
            fprintf(stderr, "dirtyring-client: %.*s\n", (int)head[1], text);
            return 2;
        } else {
            fprintf(stderr, "dirtyring-client: the warm server sent a reply this client does "
                            "not know (kind %u): is it another version?\n", head[0]);
            return 2;
        }
    }
}
