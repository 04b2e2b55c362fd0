/* limit-echo-reuseport: ../shared/reference/limit-echo.c (the minimal single-threaded
 * level-triggered epoll echo server, the practical per-core bound) with two changes only, so
 * that many copies can share one port and hold a million connections between them:
 * SO_REUSEPORT on the listener, and the descriptor limit's soft value raised to the hard one.
 * benches/million.sh busy-reference runs it as the comparison for the busy scenario.
 * Build: cc -O2 -o limit-echo-reuseport limit-echo-reuseport.c
 * Usage: limit-echo-reuseport --port P   (listens on 127.0.0.1:P)                          */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>
#include <sys/resource.h>

static char buf[64 * 1024];

/* Write all of buf[0..n).  The client bounds what it has in flight, so the
 * socket send buffer practically never fills; if it does, wait for POLLOUT
 * on this one fd rather than keep per-connection pending data. */
static int write_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w > 0) { p += w; n -= (size_t)w; continue; }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && errno == EAGAIN) {
            struct pollfd pfd = { .fd = fd, .events = POLLOUT };
            if (poll(&pfd, 1, 5000) <= 0) return -1;
            continue;
        }
        return -1;
    }
    return 0;
}

int main(int argc, char **argv) {
    int port = 7000;
    for (int i = 1; i + 1 < argc; i++)
        if (!strcmp(argv[i], "--port")) port = atoi(argv[i + 1]);
    signal(SIGPIPE, SIG_IGN);

    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(lfd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    { struct rlimit rl; getrlimit(RLIMIT_NOFILE, &rl); rl.rlim_cur = rl.rlim_max; setrlimit(RLIMIT_NOFILE, &rl); }
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(lfd, (struct sockaddr *)&a, sizeof a) || listen(lfd, 4096)) {
        perror("bind/listen");
        return 1;
    }
    int ep = epoll_create1(0);
    struct epoll_event ev = { .events = EPOLLIN, .data.fd = lfd };
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);

    struct epoll_event evs[512];
    for (;;) {
        int n = epoll_wait(ep, evs, 512, -1);
        if (n < 0) { if (errno == EINTR) continue; perror("epoll_wait"); return 1; }
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == lfd) {
                int c;
                while ((c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    struct epoll_event cev = { .events = EPOLLIN, .data.fd = c };
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
                }
                continue;
            }
            ssize_t r = read(fd, buf, sizeof buf);
            if (r > 0) {
                if (write_all(fd, buf, (size_t)r) == 0) continue;
            } else if (r < 0 && (errno == EAGAIN || errno == EINTR)) {
                continue;
            }
            close(fd); /* EOF, error, or failed write: drop the connection */
        }
    }
}
