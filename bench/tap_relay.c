/* Relay frames between a TAP (no vnet header) and a unix socket link, as a VMM's socket
 * backend does: stream = 4-byte big-endian length + frame (QEMU -netdev stream), dgram = one
 * frame per datagram. Blocking I/O, one thread per direction, whole frames only, so the relay
 * itself never drops or reorders. bench/links.py compiles it and measures its own ceiling.
 *
 *   tap_relay TAP stream|dgram connect|listen PATH
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>
#include <arpa/inet.h>

#define MAXF (65536 + 64)
static int tap, sk, stream;

static int full_read(int fd, void *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, (char *)buf + got, n - got);
        if (r <= 0) { if (r < 0 && errno == EINTR) continue; return -1; }
        got += r;
    }
    return 0;
}

static int full_writev(int fd, struct iovec *iov, int cnt) {
    while (cnt) {
        ssize_t w = writev(fd, iov, cnt);
        if (w < 0) { if (errno == EINTR) continue; return -1; }
        while (cnt && (size_t)w >= iov->iov_len) { w -= iov->iov_len; iov++; cnt--; }
        if (cnt) { iov->iov_base = (char *)iov->iov_base + w; iov->iov_len -= w; }
    }
    return 0;
}

static void *to_sock(void *arg) {
    static char buf[MAXF];
    (void)arg;
    for (;;) {
        ssize_t n = read(tap, buf, sizeof buf);
        if (n < 0) { if (errno == EINTR) continue; break; }
        if (stream) {
            uint32_t len = htonl((uint32_t)n);
            struct iovec iov[2] = {{&len, 4}, {buf, (size_t)n}};
            if (full_writev(sk, iov, 2) < 0) break;
        } else if (send(sk, buf, n, 0) < 0 && errno != ENOBUFS) break;
    }
    exit(0);
}

static void *to_tap(void *arg) {
    static char buf[MAXF];
    (void)arg;
    for (;;) {
        ssize_t n;
        if (stream) {
            uint32_t len;
            if (full_read(sk, &len, 4) < 0) break;
            n = ntohl(len);
            if (n <= 0 || n > MAXF || full_read(sk, buf, n) < 0) break;
        } else {
            n = recv(sk, buf, sizeof buf, 0);
            if (n < 0) { if (errno == EINTR) continue; break; }
        }
        if (write(tap, buf, n) < 0 && errno != EIO) break;
    }
    exit(0);
}

int main(int argc, char **argv) {
    if (argc != 5) { fprintf(stderr, "usage: %s TAP stream|dgram connect|listen PATH\n", argv[0]); return 2; }
    stream = !strcmp(argv[2], "stream");
    struct ifreq ifr = {0};
    tap = open("/dev/net/tun", O_RDWR);
    strncpy(ifr.ifr_name, argv[1], IFNAMSIZ - 1);
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI;
    if (tap < 0 || ioctl(tap, TUNSETIFF, &ifr) < 0) { perror("tap"); return 1; }
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    strncpy(sa.sun_path, argv[4], sizeof sa.sun_path - 1);
    sk = socket(AF_UNIX, stream ? SOCK_STREAM : SOCK_DGRAM, 0);
    if (!strcmp(argv[3], "listen")) {
        unlink(argv[4]);
        if (bind(sk, (struct sockaddr *)&sa, sizeof sa) < 0) { perror("bind"); return 1; }
        if (stream) {
            listen(sk, 1);
            printf("listening\n"); fflush(stdout);
            int c = accept(sk, NULL, NULL);
            if (c < 0) { perror("accept"); return 1; }
            close(sk); sk = c;
        }
    } else {
        if (!stream) {
            struct sockaddr_un me = {.sun_family = AF_UNIX};
            snprintf(me.sun_path, sizeof me.sun_path, "%s.relay", argv[4]);
            unlink(me.sun_path);
            bind(sk, (struct sockaddr *)&me, sizeof me);
        }
        if (connect(sk, (struct sockaddr *)&sa, sizeof sa) < 0) { perror("connect"); return 1; }
    }
    int big = 4 << 20;
    setsockopt(sk, SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
    setsockopt(sk, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    printf("relaying\n"); fflush(stdout);
    pthread_t a, b;
    pthread_create(&a, NULL, to_sock, NULL);
    pthread_create(&b, NULL, to_tap, NULL);
    pthread_join(a, NULL);
    return 0;
}
