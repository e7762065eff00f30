/*
 * ferry-agent: the test guest's PID 1 after /init has loaded the drivers.
 *
 * What it does, all in one single-threaded poll loop (no locks, so the
 * pattern checker can never race with the dirtier and report a false
 * corruption):
 *   - brings eth0 up with the address from the kernel command line
 *     (ferry.ip=A.B.C.D/N, optional ferry.gw=A.B.C.D);
 *   - answers UDP probes on ferry.port (default 7777):
 *         "PROBE <seq>"           -> status line with seq and CLOCK_MONOTONIC
 *         "DIRTY <mib> <mib/s>"   -> start dirtying <mib> MiB at <mib/s>
 *         "DIRTY 0 0"             -> stop dirtying
 *         "POWEROFF"              -> power the guest off
 *   - fills ferry.mem MiB (default 32) with a verifiable pattern and keeps
 *     re-checking it; any mismatch is reported on the serial console and
 *     counted in the probe reply;
 *   - on ferry.dirty=<mib>:<mib/s> dirties memory from boot;
 *   - on ferry.marker=STRING fills 1 MiB with STRING (for traffic captures);
 *   - on ferry.diskwrite=<mib>:<mib/s> writes sequence-numbered, checksummed
 *     4 KiB blocks over the first <mib> MiB of /dev/vda (O_DIRECT), cyclically:
 *     write number s goes to block s % blocks, so after S writes every block
 *     holds the newest s < S that maps to it (a reader of the image outside
 *     can check that too). "DISKCHECK <seq>" re-reads and verifies every block
 *     written; "DISKSTOP <seq>" stops writing and flushes; both answer
 *     "seq=.. disk_seq=S disk_bad=.. disk_errors=.."; ferry.diskmark=STRING
 *     fills each block's free bytes with STRING (for traffic captures);
 *   - echoes whatever arrives on TCP port ferry.port (up to 4 connections,
 *     non-blocking, in order), so a client outside can stream through the
 *     guest in both directions and check every byte;
 *   - prints a tick line every ferry.tick seconds (default 5, 0 = never);
 *   - echoes each line typed on the serial console as "FERRY-AGENT heard: ...",
 *     so a test can prove console input reaches the guest;
 *   - powers off when the ACPI power button is pressed.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/input.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define WORDS (PAGE / 8u)
#define MAX_INPUTS 8
#define CONSOLE_SLOT 1 /* fds[1] is the serial console (stdin) */
#define MAX_CONNS 4

static void say(const char *fmt, ...);

/* TCP echo: one buffer per connection; while it holds unsent bytes the
 * connection is polled for POLLOUT only, so a slow reader never blocks the loop */
static struct conn {
    int fd;
    size_t off, len;
    char buf[65536];
} conns[MAX_CONNS];

static int tcp_listen(unsigned port)
{
    int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0 || listen(s, MAX_CONNS) < 0)
        return -1;
    for (int i = 0; i < MAX_CONNS; i++)
        conns[i].fd = -1;
    return s;
}

static void conn_close(struct conn *c, const char *why)
{
    say("FERRY-AGENT tcp connection closed (%s)", why);
    close(c->fd);
    c->fd = -1;
    c->off = c->len = 0;
}

static void conn_flush(struct conn *c)
{
    while (c->off < c->len) {
        ssize_t w = write(c->fd, c->buf + c->off, c->len - c->off);
        if (w < 0) {
            if (errno != EAGAIN && errno != EINTR)
                conn_close(c, strerror(errno));
            return;
        }
        c->off += (size_t)w;
    }
    c->off = c->len = 0;
}

static void tcp_accept(int ls)
{
    struct sockaddr_in peer;
    socklen_t plen = sizeof peer;
    int fd = accept4(ls, (struct sockaddr *)&peer, &plen, SOCK_NONBLOCK);
    if (fd < 0)
        return;
    for (int i = 0; i < MAX_CONNS; i++)
        if (conns[i].fd < 0) {
            conns[i].fd = fd;
            say("FERRY-AGENT tcp connection from %s:%u", inet_ntoa(peer.sin_addr),
                ntohs(peer.sin_port));
            return;
        }
    close(fd);
}

static void tcp_serve(struct conn *c, short revents)
{
    if (c->len) {                       /* still sending the last read */
        if (revents & (POLLOUT | POLLERR | POLLHUP))
            conn_flush(c);
        return;
    }
    if (!(revents & (POLLIN | POLLERR | POLLHUP)))
        return;
    ssize_t n = read(c->fd, c->buf, sizeof c->buf);
    if (n == 0)
        conn_close(c, "end of stream");
    else if (n < 0 && errno != EAGAIN && errno != EINTR)
        conn_close(c, strerror(errno));
    else if (n > 0) {
        c->off = 0;
        c->len = (size_t)n;
        conn_flush(c);
    }
}

static char cmdline[4096];
static char boot_id[64] = "unknown";
static uint8_t *pattern;          /* the verified region */
static size_t pattern_pages;
static uint32_t *generation;      /* per page, kept inside the guest too */
static uint64_t corrupt_pages, scans, dirtied_pages;
static size_t dirty_pages;        /* size of the dirtied window, in pages */
static double dirty_rate;         /* pages per second */
static uint64_t dirty_start_ns, dirty_done;
static size_t dirty_cursor, check_cursor;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void say(const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if (n > (int)sizeof buf - 2)
        n = (int)sizeof buf - 2;
    buf[n++] = '\n';
    /* fd 1 is the serial console (/init redirects it there) */
    if (write(1, buf, (size_t)n) < 0) {
        /* nothing sensible to do */
    }
}

static const char *arg(const char *key)
{
    static char val[512];
    size_t klen = strlen(key);
    const char *p = cmdline;
    while (p && *p) {
        while (*p == ' ')
            p++;
        if (strncmp(p, key, klen) == 0 && p[klen] == '=') {
            const char *v = p + klen + 1;
            size_t n = strcspn(v, " \n");
            if (n >= sizeof val)
                n = sizeof val - 1;
            memcpy(val, v, n);
            val[n] = 0;
            return val;
        }
        p = strchr(p, ' ');
    }
    return NULL;
}

static uint64_t mix(uint64_t x)
{
    /* splitmix64 finaliser: cheap and every input bit matters */
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static void write_page(size_t i)
{
    uint64_t *w = (uint64_t *)(pattern + i * PAGE);
    uint64_t base = mix(((uint64_t)i << 32) ^ generation[i]);
    w[0] = ((uint64_t)i << 32) | generation[i];
    for (unsigned j = 1; j < WORDS; j++)
        w[j] = base + j * 0x2545f4914f6cdd1dull;
}

static void check_page(size_t i)
{
    const uint64_t *w = (const uint64_t *)(pattern + i * PAGE);
    uint64_t head = ((uint64_t)i << 32) | generation[i];
    uint64_t base = mix(((uint64_t)i << 32) ^ generation[i]);
    int bad = w[0] != head;
    for (unsigned j = 1; j < WORDS && !bad; j++)
        bad = w[j] != base + j * 0x2545f4914f6cdd1dull;
    if (bad) {
        corrupt_pages++;
        say("FERRY-AGENT CORRUPTION page=%zu gen=%u total=%llu", i,
            generation[i], (unsigned long long)corrupt_pages);
        write_page(i); /* re-arm, so one bad page is reported once */
    }
}

static void net_up(void)
{
    const char *ip = arg("ferry.ip");
    if (!ip) {
        say("FERRY-AGENT no ferry.ip: network left down");
        return;
    }
    char addr[64];
    snprintf(addr, sizeof addr, "%s", ip);
    int prefix = 24;
    char *slash = strchr(addr, '/');
    if (slash) {
        *slash = 0;
        prefix = atoi(slash + 1);
    }
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strcpy(ifr.ifr_name, "eth0");
    struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
    sin->sin_family = AF_INET;
    if (inet_pton(AF_INET, addr, &sin->sin_addr) != 1 || prefix < 0 || prefix > 32) {
        say("FERRY-AGENT bad ferry.ip=%s", ip);
        close(s);
        return;
    }
    int rc = ioctl(s, SIOCSIFADDR, &ifr);
    sin->sin_addr.s_addr = prefix ? htonl(0xffffffffu << (32 - prefix)) : 0;
    rc |= ioctl(s, SIOCSIFNETMASK, &ifr);
    ioctl(s, SIOCGIFFLAGS, &ifr);
    ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
    rc |= ioctl(s, SIOCSIFFLAGS, &ifr);
    /* loopback too, for servers inside the guest */
    struct ifreq lo;
    memset(&lo, 0, sizeof lo);
    strcpy(lo.ifr_name, "lo");
    ioctl(s, SIOCGIFFLAGS, &lo);
    lo.ifr_flags |= IFF_UP;
    ioctl(s, SIOCSIFFLAGS, &lo);
    const char *gw = arg("ferry.gw");
    if (gw) {
        struct rtentry rt;
        memset(&rt, 0, sizeof rt);
        ((struct sockaddr_in *)&rt.rt_dst)->sin_family = AF_INET;
        ((struct sockaddr_in *)&rt.rt_genmask)->sin_family = AF_INET;
        struct sockaddr_in *g = (struct sockaddr_in *)&rt.rt_gateway;
        g->sin_family = AF_INET;
        inet_pton(AF_INET, gw, &g->sin_addr);
        rt.rt_flags = RTF_UP | RTF_GATEWAY;
        rc |= ioctl(s, SIOCADDRT, &rt);
    }
    close(s);
    say("FERRY-AGENT eth0 %s/%d%s", addr, prefix, rc ? " (error)" : " up");
}

static void set_dirty(size_t mib, double rate_mib)
{
    dirty_pages = mib * (1024 * 1024 / PAGE);
    if (dirty_pages > pattern_pages)
        dirty_pages = pattern_pages;
    dirty_rate = rate_mib * (1024 * 1024 / PAGE);
    dirty_start_ns = now_ns();
    dirty_done = 0;
    say("FERRY-AGENT dirty %zu MiB at %.1f MiB/s", dirty_pages * PAGE >> 20, rate_mib);
}

static void do_dirty(void)
{
    if (!dirty_pages || dirty_rate <= 0)
        return;
    double secs = (double)(now_ns() - dirty_start_ns) / 1e9;
    uint64_t due = (uint64_t)(secs * dirty_rate);
    unsigned budget = 256; /* keep the loop responsive to probes */
    while (dirty_done < due && budget--) {
        size_t i = dirty_cursor++ % dirty_pages;
        generation[i]++;
        write_page(i);
        dirty_done++;
        dirtied_pages++;
    }
    if (dirty_done < due && due - dirty_done > (uint64_t)dirty_rate)
        dirty_done = due - (uint64_t)dirty_rate; /* don't build a backlog */
}

static void do_check(void)
{
    for (unsigned n = 0; n < 64 && pattern_pages; n++) {
        check_page(check_cursor++);
        if (check_cursor == pattern_pages) {
            check_cursor = 0;
            scans++;
        }
    }
}

/* -- the disk writer ------------------------------------------------------------ */
#define DISK_MAGIC 0x314b445952524546ull /* "FERRYDK1" little-endian */
static int disk_fd = -1;
static size_t disk_blocks;      /* the written region, in blocks */
static double disk_rate;        /* blocks per second */
static uint64_t disk_seq;       /* writes done */
static uint64_t disk_start_ns, disk_bad, disk_errors;
static uint8_t *disk_buf, *disk_rbuf;
static int disk_stopped;
static char disk_mark[64];

/* block contents of write number seq: magic, block, seq, words from seq (or the
 * marker), and last the XOR of all words before it */
static void disk_fill(uint64_t seq, uint64_t *w)
{
    uint64_t base = mix(seq);
    w[0] = DISK_MAGIC;
    w[1] = seq % disk_blocks;
    w[2] = seq;
    for (unsigned j = 3; j < WORDS - 1; j++)
        w[j] = base + j * 0x2545f4914f6cdd1dull;
    size_t mlen = strlen(disk_mark);
    if (mlen)
        for (size_t off = 24; off + mlen <= PAGE - 8; off += mlen)
            memcpy((uint8_t *)w + off, disk_mark, mlen);
    uint64_t x = 0;
    for (unsigned j = 0; j < WORDS - 1; j++)
        x ^= w[j];
    w[WORDS - 1] = x;
}

static void disk_start(size_t mib, double rate_mib)
{
    disk_fd = open("/dev/vda", O_RDWR | O_DIRECT);
    if (disk_fd < 0 || posix_memalign((void **)&disk_buf, PAGE, PAGE) ||
        posix_memalign((void **)&disk_rbuf, PAGE, PAGE)) {
        say("FERRY-AGENT cannot open /dev/vda for writing: %s", strerror(errno));
        disk_fd = -1;
        return;
    }
    disk_blocks = mib * (1024 * 1024 / PAGE);
    disk_rate = rate_mib * (1024 * 1024 / PAGE);
    disk_start_ns = now_ns();
    say("FERRY-AGENT disk writer: %zu MiB at %.1f MiB/s", mib, rate_mib);
}

static void do_disk(void)
{
    if (disk_fd < 0 || disk_stopped || !disk_blocks)
        return;
    uint64_t target = (uint64_t)((double)(now_ns() - disk_start_ns) / 1e9 * disk_rate);
    for (int k = 0; k < 64 && disk_seq < target; k++) {
        disk_fill(disk_seq, (uint64_t *)disk_buf);
        off_t at = (off_t)(disk_seq % disk_blocks) * PAGE;
        if (pwrite(disk_fd, disk_buf, PAGE, at) != (ssize_t)PAGE) {
            disk_errors++;
            return; /* try again next round */
        }
        disk_seq++;
    }
}

static void disk_check(void)
{
    if (disk_fd < 0)
        return;
    size_t written = disk_seq < disk_blocks ? (size_t)disk_seq : disk_blocks;
    for (size_t b = 0; b < written; b++) {
        /* the newest write that went to block b */
        uint64_t seq = b + (disk_seq - 1 - b) / disk_blocks * disk_blocks;
        disk_fill(seq, (uint64_t *)disk_buf);
        if (pread(disk_fd, disk_rbuf, PAGE, (off_t)b * PAGE) != (ssize_t)PAGE ||
            memcmp(disk_buf, disk_rbuf, PAGE) != 0) {
            disk_bad++;
            say("FERRY-AGENT DISK CORRUPTION block=%zu seq=%llu total=%llu", b,
                (unsigned long long)seq, (unsigned long long)disk_bad);
        }
    }
}

static void poweroff(void)
{
    say("FERRY-AGENT poweroff");
    sync();
    reboot(RB_POWER_OFF);
}

static void handle_probe(int s)
{
    char buf[256], out[512];
    struct sockaddr_in peer;
    socklen_t plen = sizeof peer;
    ssize_t n = recvfrom(s, buf, sizeof buf - 1, 0, (struct sockaddr *)&peer, &plen);
    if (n <= 0)
        return;
    buf[n] = 0;
    unsigned long long seq = 0;
    unsigned long mib = 0;
    double rate = 0;
    if (sscanf(buf, "DIRTY %lu %lf", &mib, &rate) == 2) {
        set_dirty(mib, rate);
    } else if (sscanf(buf, "DISKCHECK %llu", &seq) == 1 ||
               sscanf(buf, "DISKSTOP %llu", &seq) == 1) {
        if (buf[4] == 'S') { /* DISKSTOP */
            disk_stopped = 1;
            if (disk_fd >= 0)
                fdatasync(disk_fd);
        }
        disk_check();
        int len = snprintf(out, sizeof out,
                           "seq=%llu disk_seq=%llu disk_blocks=%zu disk_bad=%llu "
                           "disk_errors=%llu", seq, (unsigned long long)disk_seq,
                           disk_blocks, (unsigned long long)disk_bad,
                           (unsigned long long)disk_errors);
        sendto(s, out, (size_t)len, 0, (struct sockaddr *)&peer, plen);
        return;
    } else if (strncmp(buf, "POWEROFF", 8) == 0) {
        poweroff();
    } else if (sscanf(buf, "PROBE %llu", &seq) != 1) {
        return;
    }
    int len = snprintf(out, sizeof out,
                       "seq=%llu mono_ns=%llu boot_id=%s corrupt=%llu scans=%llu "
                       "dirtied=%llu pattern_mib=%zu dirty_mib=%zu",
                       seq, (unsigned long long)now_ns(), boot_id,
                       (unsigned long long)corrupt_pages, (unsigned long long)scans,
                       (unsigned long long)dirtied_pages, pattern_pages * PAGE >> 20,
                       dirty_pages * PAGE >> 20);
    sendto(s, out, (size_t)len, 0, (struct sockaddr *)&peer, plen);
}

static int open_power_buttons(struct pollfd *fds, int max)
{
    int n = 0;
    DIR *d = opendir("/dev/input");
    if (!d)
        return 0;
    struct dirent *e;
    while ((e = readdir(d)) && n < max) {
        if (strncmp(e->d_name, "event", 5) != 0)
            continue;
        char path[300];
        snprintf(path, sizeof path, "/dev/input/%s", e->d_name);
        int fd = open(path, O_RDONLY | O_NONBLOCK);
        if (fd >= 0) {
            fds[n].fd = fd;
            fds[n].events = POLLIN;
            n++;
        }
    }
    closedir(d);
    return n;
}

int main(void)
{
    int fd = open("/proc/cmdline", O_RDONLY);
    if (fd >= 0) {
        ssize_t n = read(fd, cmdline, sizeof cmdline - 1);
        cmdline[n > 0 ? n : 0] = 0;
        close(fd);
    }
    fd = open("/proc/sys/kernel/random/boot_id", O_RDONLY);
    if (fd >= 0) {
        ssize_t n = read(fd, boot_id, sizeof boot_id - 1);
        boot_id[n > 0 ? n : 0] = 0;
        boot_id[strcspn(boot_id, "\n")] = 0;
        close(fd);
    }
    const char *v;
    size_t mem_mib = (v = arg("ferry.mem")) ? strtoul(v, NULL, 10) : 32;
    unsigned port = (v = arg("ferry.port")) ? (unsigned)strtoul(v, NULL, 10) : 7777;
    unsigned tick = (v = arg("ferry.tick")) ? (unsigned)strtoul(v, NULL, 10) : 5;

    pattern_pages = mem_mib * (1024 * 1024 / PAGE);
    if (pattern_pages) {
        pattern = mmap(NULL, pattern_pages * PAGE, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
        generation = calloc(pattern_pages, sizeof *generation);
        if (pattern == MAP_FAILED || !generation) {
            say("FERRY-AGENT cannot allocate %zu MiB", mem_mib);
            pattern_pages = 0;
        } else {
            for (size_t i = 0; i < pattern_pages; i++)
                write_page(i);
        }
    }
    if ((v = arg("ferry.marker"))) {
        size_t mlen = strlen(v), size = 1024 * 1024;
        char *m = mmap(NULL, size, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
        if (m != MAP_FAILED && mlen)
            for (size_t off = 0; off + mlen <= size; off += mlen)
                memcpy(m + off, v, mlen);
    }

    net_up();
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0)
        say("FERRY-AGENT cannot bind udp/%u: %s", port, strerror(errno));

    if ((v = arg("ferry.dirty"))) {
        unsigned long mib = 0;
        double rate = 0;
        if (sscanf(v, "%lu:%lf", &mib, &rate) == 2)
            set_dirty(mib, rate);
    }

    if ((v = arg("ferry.diskmark")))
        snprintf(disk_mark, sizeof disk_mark, "%s", v);
    if ((v = arg("ferry.diskwrite"))) {
        unsigned long mib = 0;
        double rate = 0;
        if (sscanf(v, "%lu:%lf", &mib, &rate) == 2 && mib)
            disk_start(mib, rate);
    }

    int ls = tcp_listen(port);
    if (ls < 0)
        say("FERRY-AGENT cannot listen on tcp/%u: %s", port, strerror(errno));
    struct pollfd fds[2 + MAX_INPUTS + 1 + MAX_CONNS];
    fds[0].fd = s;
    fds[0].events = POLLIN;
    fds[CONSOLE_SLOT].fd = 0;
    fds[CONSOLE_SLOT].events = POLLIN;
    int nbase = 2 + open_power_buttons(fds + 2, MAX_INPUTS);
    int nfds = nbase + 1 + MAX_CONNS;
    char line[256];
    size_t line_len = 0;
    fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);

    say("FERRY-AGENT READY boot_id=%s udp=%u pattern_mib=%zu", boot_id, port, mem_mib);
    uint64_t next_tick = now_ns() + (uint64_t)tick * 1000000000ull, ticks = 0;
    for (;;) {
        int busy = pattern_pages > 0 || dirty_pages > 0 || (disk_fd >= 0 && !disk_stopped);
        fds[nbase].fd = ls;
        fds[nbase].events = POLLIN;
        for (int i = 0; i < MAX_CONNS; i++) {
            fds[nbase + 1 + i].fd = conns[i].fd;   /* -1: ignored by poll */
            fds[nbase + 1 + i].events = conns[i].len ? POLLOUT : POLLIN;
            fds[nbase + 1 + i].revents = 0;
        }
        int r = poll(fds, (nfds_t)nfds, busy ? 10 : 200);
        if (r > 0) {
            if (fds[0].revents & POLLIN)
                for (int k = 0; k < 16; k++)
                    handle_probe(s);
            if (fds[CONSOLE_SLOT].revents & POLLIN) {
                char c;
                while (read(0, &c, 1) == 1) {
                    if (c == '\r' || c == '\n') {
                        line[line_len] = 0;
                        if (line_len)
                            say("FERRY-AGENT heard: %s", line);
                        line_len = 0;
                        continue;
                    }
                    if (line_len < sizeof line - 1)
                        line[line_len++] = c;
                }
            }
            if (ls >= 0 && fds[nbase].revents & POLLIN)
                tcp_accept(ls);
            for (int i = 0; i < MAX_CONNS; i++)
                if (conns[i].fd >= 0 && fds[nbase + 1 + i].fd == conns[i].fd)
                    tcp_serve(&conns[i], fds[nbase + 1 + i].revents);
            for (int k = 2; k < nbase; k++) {
                struct input_event ev;
                while (fds[k].revents & POLLIN &&
                       read(fds[k].fd, &ev, sizeof ev) == (ssize_t)sizeof ev)
                    if (ev.type == EV_KEY && ev.code == KEY_POWER && ev.value == 1)
                        poweroff();
            }
        }
        do_dirty();
        do_disk();
        do_check();
        if (tick && now_ns() >= next_tick) {
            ticks++;
            next_tick += (uint64_t)tick * 1000000000ull;
            say("FERRY-AGENT tick=%llu corrupt=%llu scans=%llu", (unsigned long long)ticks,
                (unsigned long long)corrupt_pages, (unsigned long long)scans);
        }
    }
}
