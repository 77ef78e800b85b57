/* One direction of bench/_netns.py's TUN delay line, in C (the Python
 * fallback in _netns.py does the same, at a higher cost per packet).
 *
 *   _delayline FD_IN FD_OUT      (control on stdin: one-way delay in seconds,
 *                                 a line each; end of input: exit)
 *
 * Reads IP packets from FD_IN, holds each for the delay current when it
 * arrived, then writes it to FD_OUT, in order. At most QUEUE packets wait;
 * more are dropped, as a full link queue would. Runs SCHED_FIFO when it may,
 * so that a busy machine delays packets by the set delay, not by a wait for
 * a CPU. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#define QUEUE 16384
#define PACKET 65536

struct slot { double due; ssize_t len; char *buf; };

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s FD_IN FD_OUT\n", argv[0]);
        return 2;
    }
    int in = atoi(argv[1]), out = atoi(argv[2]);
    prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);  /* wake within 1 us of a deadline */
    /* A wire does not wait for a CPU: run ahead of the benchmark's processes
     * where allowed (root). It sleeps in ppoll between packets. */
    struct sched_param prio = {.sched_priority = 10};
    sched_setscheduler(0, SCHED_FIFO, &prio);
    fcntl(in, F_SETFL, fcntl(in, F_GETFL) | O_NONBLOCK);
    static struct slot q[QUEUE];
    size_t head = 0, count = 0;
    double delay = 0.0;
    char line[64];
    size_t line_len = 0;
    for (;;) {
        double t = now();
        while (count && q[head].due <= t) {
            if (write(out, q[head].buf, q[head].len) < 0 && errno == EIO) return 0;
            head = (head + 1) % QUEUE;
            count--;
        }
        struct timespec wait = {0, 200000000};  /* idle: check the control input */
        if (count) {
            double left = q[head].due - t;
            if (left < 0) left = 0;
            wait.tv_sec = (time_t)left;
            wait.tv_nsec = (long)((left - (double)wait.tv_sec) * 1e9);
        }
        struct pollfd fds[2] = {{in, POLLIN, 0}, {0, POLLIN, 0}};
        if (ppoll(fds, 2, &wait, NULL) < 0) {
            if (errno == EINTR) continue;
            return 1;
        }
        if (fds[1].revents) {  /* a new delay, or end of input */
            char c;
            ssize_t r = read(0, &c, 1);
            if (r <= 0) return 0;
            if (c == '\n') {
                line[line_len] = 0;
                delay = atof(line);
                line_len = 0;
            } else if (line_len < sizeof line - 1) {
                line[line_len++] = c;
            }
        }
        if (fds[0].revents & (POLLERR | POLLHUP | POLLNVAL)) return 0;  /* device gone */
        if (!(fds[0].revents & POLLIN)) continue;
        for (;;) {
            struct slot *s = &q[(head + count) % QUEUE];
            if (!s->buf && !(s->buf = malloc(PACKET))) return 1;
            char drop[PACKET];
            ssize_t r = read(in, count < QUEUE ? s->buf : drop, PACKET);
            if (r < 0) {
                if (errno == EAGAIN || errno == EINTR) break;
                return 0;  /* the device went with its namespace */
            }
            if (count == QUEUE) continue;  /* queue full: dropped */
            s->len = r;
            s->due = now() + delay;
            count++;
        }
    }
}
