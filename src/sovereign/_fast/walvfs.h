/* A SQLite VFS shim that joins the writes of a WAL commit, one write per page, and
 * starts every durable commit on a fresh page of the WAL (walvfs.pyx).
 *
 * SQLite appends every WAL frame with two writes (its 24-byte header, then the page),
 * so a commit of 12 one-KiB frames is 24 pwrite() calls. This shim wraps the default
 * VFS and, for WAL files only, keeps appended bytes in a buffer and writes them out
 * together, one write per memory page of the file (see sov_flush):
 *
 * - Only appends are buffered: writes at or past the end of what was written since the
 *   WAL header (a header write at offset 0 means SQLite starts the WAL over). A write
 *   below that end (a frame written again in place, a frame checksum rewritten after
 *   the commit frame when a transaction wrote a page twice) first writes out the
 *   buffer, then goes straight to the file: the file never misses anything but the
 *   frames being appended.
 * - Frames are found by their place, not by the size of the writes that carry them:
 *   the WAL header gives the page size, so frame k ends at 32 + (k + 1) * (24 + page
 *   size). Until the shim has seen a WAL header (written, or read at offset 0), it
 *   buffers nothing.
 * - The buffer is written out when a write completes a commit frame (its header
 *   carries the database size, which only a commit frame has; a frame whose header is
 *   no longer in the buffer counts as one), before any sync, read, size, truncate,
 *   file-control or close, and when it is full. So a committed transaction is in the
 *   file before SQLite publishes it to other connections in the wal-index, and before
 *   the fsync that makes it durable: other connections and crash recovery see exactly
 *   what they would without the shim.
 * - Bytes still buffered when the process dies belong to a transaction that had not
 *   committed: the same as a crash before those writes.
 *
 * Sector alignment (sov_sector_bytes, 0 = off). Frames are 24 + page size bytes, so a
 * commit ends inside a 4 KiB page of the file; after its fsync the next commit dirties
 * that page again, and the kernel writes it to the disk once per commit: ~4 KiB more
 * per durable commit than its frames. SQLite has the remedy built in: on storage
 * without "power-safe overwrite" it pads every synced commit with copies of its last
 * frame up to the next sector boundary (sqlite3WalFrames), so the next commit starts
 * on a page nobody wrote since the fsync. It decides that from the database file's
 * device characteristics, and its pager would also write whole sectors of pages on such
 * storage. So the shim reports, for the main database file, no power-safe overwrite
 * with 512-byte sectors (the pager then writes single pages, as before), and for WAL
 * files sectors of sov_sector_bytes. The padding frames are SQLite's own, valid
 * commit frames, which recovery reads like any other. SQLite writes the frame that
 * crosses the boundary in two parts with the fsync between them; the frame rule above
 * writes the second part out before the commit is published.
 *
 * No SQLite header is needed to build: the few public ABI structures are declared here
 * (stable since SQLite 3.7.6; iVersion tells which members exist), and the two API
 * functions come as addresses from the loaded library (walvfs.pyx). */
#ifndef SOVEREIGN_WALVFS_H
#define SOVEREIGN_WALVFS_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int64_t sov_i64;
typedef struct sov_file sov_file;
typedef struct sov_vfs sov_vfs;

typedef struct sov_io_methods {
    int iVersion;
    int (*xClose)(sov_file *);
    int (*xRead)(sov_file *, void *, int, sov_i64);
    int (*xWrite)(sov_file *, const void *, int, sov_i64);
    int (*xTruncate)(sov_file *, sov_i64);
    int (*xSync)(sov_file *, int);
    int (*xFileSize)(sov_file *, sov_i64 *);
    int (*xLock)(sov_file *, int);
    int (*xUnlock)(sov_file *, int);
    int (*xCheckReservedLock)(sov_file *, int *);
    int (*xFileControl)(sov_file *, int, void *);
    int (*xSectorSize)(sov_file *);
    int (*xDeviceCharacteristics)(sov_file *);
    /* version 2 */
    int (*xShmMap)(sov_file *, int, int, int, void volatile **);
    int (*xShmLock)(sov_file *, int, int, int);
    void (*xShmBarrier)(sov_file *);
    int (*xShmUnmap)(sov_file *, int);
    /* version 3 */
    int (*xFetch)(sov_file *, sov_i64, int, void **);
    int (*xUnfetch)(sov_file *, sov_i64, void *);
} sov_io_methods;

struct sov_file {
    const sov_io_methods *pMethods;
};

struct sov_vfs {
    int iVersion;
    int szOsFile;
    int mxPathname;
    sov_vfs *pNext;
    const char *zName;
    void *pAppData;
    int (*xOpen)(sov_vfs *, const char *, sov_file *, int, int *);
    /* the rest is copied from the wrapped VFS and never called through here */
    void *rest[15]; /* xDelete ... xNextSystemCall (iVersion 3) */
};

#define SOV_OK 0
#define SOV_IOERR_NOMEM 3082 /* SQLITE_IOERR_NOMEM */
#define SOV_OPEN_MAIN_DB 0x00000100
#define SOV_OPEN_WAL 0x00080000
#define SOV_IOCAP_POWERSAFE_OVERWRITE 0x00001000
#define SOV_WAL_HEADER 32 /* bytes before the first frame */
#define SOV_FRAME_HEADER 24

enum { SOV_OTHER = 0, SOV_MAIN_DB = 1, SOV_WAL = 2 };

/* Our part of an open file; the wrapped VFS's own file structure follows it. */
typedef struct sov_shim {
    sov_file base;       /* pMethods: sov_wal_methods or sov_plain_methods */
    unsigned char *buf;  /* WAL only: the run of appends not yet written */
    int cap, len;
    sov_i64 start;       /* file offset of buf[0] */
    sov_i64 end;         /* end of the WAL as written so far (0 again at a restart) */
    sov_i64 frame;       /* WAL only: bytes per frame (24 + page size), 0 until known */
    int kind;            /* SOV_MAIN_DB, SOV_WAL or SOV_OTHER */
} sov_shim;

#define SOV_REAL_OFFSET ((int)((sizeof(sov_shim) + 15) & ~(size_t)15))
#define SOV_REAL(p) ((sov_file *)((char *)(p) + SOV_REAL_OFFSET))

static sov_vfs *sov_wrapped = 0;
static sov_vfs sov_vfs_self;
static int sov_buffer_bytes = 256 * 1024;
static int sov_sector_bytes = 0; /* sector alignment of synced WAL commits; 0 = off */
/* Counters (the writer thread is the only writer of WAL files; approximate if not). */
static sov_i64 sov_stat_writes = 0;  /* WAL writes SQLite asked for */
static sov_i64 sov_stat_calls = 0;   /* WAL writes passed to the wrapped VFS */

/* The buffer goes out in pieces that end at 4 KiB boundaries of the file, one memory
 * page each: a 4-page commit is 4 writes, not 1, on purpose. Linux (6.x, ext4) gives a
 * larger write larger page-cache folios, and each commit re-dirties the folio at the
 * WAL's end: with one write per commit, 16 KiB folios were written back where 4 KiB
 * pages had been, +12% bytes written per message at 1,000 msgs/s (measured per thread
 * in /proc: the writer's write_bytes 10.5 -> 11.8 KB per message; with page-sized
 * pieces 10.5 either way). The unix VFS also writes at most 128 KiB - 1 per call. */
static const int sov_piece = 4096;

static int sov_flush(sov_shim *p) {
    int rc = SOV_OK, done = 0;
    sov_file *real = SOV_REAL(p);
    while (rc == SOV_OK && done < p->len) {
        sov_i64 at = p->start + done;
        int n = sov_piece - (int)(at % sov_piece);
        if (n > p->len - done) n = p->len - done;
        sov_stat_calls++;
        rc = real->pMethods->xWrite(real, p->buf + done, n, p->start + done);
        done += n;
    }
    p->len = 0;
    return rc;
}

/* -- WAL files ---------------------------------------------------------------- */

/* The frame size from a WAL header (magic 0x377f0682/3, page size big-endian at byte
 * 8, 1 meaning 65536), or 0 if ``h`` is not one. */
static sov_i64 sov_frame_size(const unsigned char *h) {
    unsigned magic = ((unsigned)h[0] << 24) | ((unsigned)h[1] << 16) | ((unsigned)h[2] << 8) | h[3];
    unsigned page = ((unsigned)h[8] << 24) | ((unsigned)h[9] << 16) | ((unsigned)h[10] << 8) | h[11];
    if ((magic & 0xFFFFFFFEu) != 0x377f0682u) return 0;
    if (page == 1) page = 65536;
    if (page < 512 || page > 65536 || (page & (page - 1)) != 0) return 0;
    return (sov_i64)page + SOV_FRAME_HEADER;
}

/* Whether a write that ended at ``end`` completed a commit frame (see the header): a
 * frame ends there and its header says so, or is no longer in the buffer to ask. */
static int sov_commit_complete(const sov_shim *p, sov_i64 end) {
    sov_i64 head;
    const unsigned char *h;
    if (end <= SOV_WAL_HEADER || (end - SOV_WAL_HEADER) % p->frame != 0) return 0;
    head = end - p->frame;
    if (head < p->start || head + 8 > p->start + p->len) return 1;
    h = p->buf + (head - p->start);
    return (h[4] | h[5] | h[6] | h[7]) != 0;
}

static int sov_wal_close(sov_file *f) {
    sov_shim *p = (sov_shim *)f;
    sov_file *real = SOV_REAL(p);
    int rc = sov_flush(p);
    int rc2 = real->pMethods->xClose(real);
    free(p->buf);
    p->buf = 0;
    return rc != SOV_OK ? rc : rc2;
}

static int sov_wal_read(sov_file *f, void *out, int n, sov_i64 off) {
    sov_shim *p = (sov_shim *)f;
    sov_file *real = SOV_REAL(p);
    int rc = sov_flush(p);
    if (rc != SOV_OK) return rc;
    rc = real->pMethods->xRead(real, out, n, off);
    if (rc == SOV_OK && off == 0 && n >= SOV_WAL_HEADER && p->frame == 0)
        p->frame = sov_frame_size((const unsigned char *)out);
    return rc;
}

static int sov_wal_write(sov_file *f, const void *data, int n, sov_i64 off) {
    sov_shim *p = (sov_shim *)f;
    sov_file *real = SOV_REAL(p);
    int rc;
    sov_stat_writes++;
    if (off == 0) { /* the WAL header: SQLite starts the WAL over */
        p->end = 0;
        p->frame = n >= SOV_WAL_HEADER ? sov_frame_size((const unsigned char *)data) : 0;
    }
    if (off < p->end || p->frame == 0 || p->cap == 0) {
        /* Not an append (a frame written again in place, a frame header whose checksum
         * is rewritten after the commit frame), or frames not yet known: into the file
         * at once, after what is buffered (a NORMAL commit has no sync to write it). */
        rc = sov_flush(p);
        if (rc != SOV_OK) return rc;
        sov_stat_calls++;
        rc = real->pMethods->xWrite(real, data, n, off);
        if (rc == SOV_OK && off + n > p->end) p->end = off + n;
        return rc;
    }
    if (p->len > 0 && off == p->start + p->len && p->len + n <= p->cap) {
        memcpy(p->buf + p->len, data, (size_t)n);
        p->len += n;
    } else {
        rc = sov_flush(p);
        if (rc != SOV_OK) return rc;
        if (n < p->cap) {
            memcpy(p->buf, data, (size_t)n);
            p->start = off;
            p->len = n;
        } else {
            sov_stat_calls++;
            rc = real->pMethods->xWrite(real, data, n, off);
            if (rc == SOV_OK) p->end = off + n;
            return rc;
        }
    }
    p->end = off + n;
    if (sov_commit_complete(p, p->end)) return sov_flush(p); /* into the file */
    return SOV_OK;
}

static int sov_wal_truncate(sov_file *f, sov_i64 size) {
    sov_shim *p = (sov_shim *)f;
    sov_file *real = SOV_REAL(p);
    int rc = sov_flush(p);
    if (rc != SOV_OK) return rc;
    if (size < p->end) p->end = size;
    return real->pMethods->xTruncate(real, size);
}

static int sov_wal_sync(sov_file *f, int flags) {
    sov_shim *p = (sov_shim *)f;
    sov_file *real = SOV_REAL(p);
    int rc = sov_flush(p);
    if (rc != SOV_OK) return rc;
    return real->pMethods->xSync(real, flags);
}

static int sov_wal_file_size(sov_file *f, sov_i64 *size) {
    sov_shim *p = (sov_shim *)f;
    sov_file *real = SOV_REAL(p);
    int rc = sov_flush(p);
    if (rc != SOV_OK) return rc;
    return real->pMethods->xFileSize(real, size);
}

static int sov_wal_file_control(sov_file *f, int op, void *arg) {
    sov_shim *p = (sov_shim *)f;
    sov_file *real = SOV_REAL(p);
    int rc = sov_flush(p);
    if (rc != SOV_OK) return rc;
    return real->pMethods->xFileControl(real, op, arg);
}

/* -- everything else is passed through (also for WAL files) --------------------- */

static int sov_close(sov_file *f) {
    sov_file *real = SOV_REAL(f);
    return real->pMethods->xClose(real);
}
static int sov_read(sov_file *f, void *out, int n, sov_i64 off) {
    sov_file *real = SOV_REAL(f);
    return real->pMethods->xRead(real, out, n, off);
}
static int sov_write(sov_file *f, const void *data, int n, sov_i64 off) {
    sov_file *real = SOV_REAL(f);
    return real->pMethods->xWrite(real, data, n, off);
}
static int sov_truncate(sov_file *f, sov_i64 size) {
    sov_file *real = SOV_REAL(f);
    return real->pMethods->xTruncate(real, size);
}
static int sov_sync(sov_file *f, int flags) {
    sov_file *real = SOV_REAL(f);
    return real->pMethods->xSync(real, flags);
}
static int sov_file_size(sov_file *f, sov_i64 *size) {
    sov_file *real = SOV_REAL(f);
    return real->pMethods->xFileSize(real, size);
}
static int sov_lock(sov_file *f, int level) {
    sov_file *real = SOV_REAL(f);
    return real->pMethods->xLock(real, level);
}
static int sov_unlock(sov_file *f, int level) {
    sov_file *real = SOV_REAL(f);
    return real->pMethods->xUnlock(real, level);
}
static int sov_check_reserved(sov_file *f, int *out) {
    sov_file *real = SOV_REAL(f);
    return real->pMethods->xCheckReservedLock(real, out);
}
static int sov_file_control(sov_file *f, int op, void *arg) {
    sov_file *real = SOV_REAL(f);
    return real->pMethods->xFileControl(real, op, arg);
}
/* Sector alignment (see the header): 512-byte sectors without power-safe overwrite for
 * the main database, sov_sector_bytes for WAL files. */
static int sov_sector_size(sov_file *f) {
    sov_shim *p = (sov_shim *)f;
    sov_file *real = SOV_REAL(p);
    if (sov_sector_bytes > 0 && p->kind == SOV_MAIN_DB) return 512;
    if (sov_sector_bytes > 0 && p->kind == SOV_WAL) return sov_sector_bytes;
    return real->pMethods->xSectorSize(real);
}
static int sov_device_characteristics(sov_file *f) {
    sov_shim *p = (sov_shim *)f;
    sov_file *real = SOV_REAL(p);
    int dc = real->pMethods->xDeviceCharacteristics(real);
    if (sov_sector_bytes > 0 && p->kind == SOV_MAIN_DB) dc &= ~SOV_IOCAP_POWERSAFE_OVERWRITE;
    return dc;
}
static int sov_shm_map(sov_file *f, int page, int size, int extend, void volatile **out) {
    sov_file *real = SOV_REAL(f);
    return real->pMethods->xShmMap(real, page, size, extend, out);
}
static int sov_shm_lock(sov_file *f, int offset, int n, int flags) {
    sov_file *real = SOV_REAL(f);
    return real->pMethods->xShmLock(real, offset, n, flags);
}
static void sov_shm_barrier(sov_file *f) {
    sov_file *real = SOV_REAL(f);
    real->pMethods->xShmBarrier(real);
}
static int sov_shm_unmap(sov_file *f, int delete_flag) {
    sov_file *real = SOV_REAL(f);
    return real->pMethods->xShmUnmap(real, delete_flag);
}
static int sov_fetch(sov_file *f, sov_i64 off, int n, void **out) {
    sov_file *real = SOV_REAL(f);
    return real->pMethods->xFetch(real, off, n, out);
}
static int sov_unfetch(sov_file *f, sov_i64 off, void *ptr) {
    sov_file *real = SOV_REAL(f);
    return real->pMethods->xUnfetch(real, off, ptr);
}

/* One pair of method tables per iVersion of the wrapped file's methods (1-3): SQLite
 * looks at iVersion before it calls a v2/v3 member, so ours must not claim more. */
#define SOV_PLAIN(v)                                                                     \
    {v, sov_close, sov_read, sov_write, sov_truncate, sov_sync, sov_file_size, sov_lock, \
     sov_unlock, sov_check_reserved, sov_file_control, sov_sector_size,                  \
     sov_device_characteristics, sov_shm_map, sov_shm_lock, sov_shm_barrier,            \
     sov_shm_unmap, sov_fetch, sov_unfetch}
#define SOV_WAL(v)                                                                      \
    {v, sov_wal_close, sov_wal_read, sov_wal_write, sov_wal_truncate, sov_wal_sync,     \
     sov_wal_file_size, sov_lock, sov_unlock, sov_check_reserved, sov_wal_file_control, \
     sov_sector_size, sov_device_characteristics, sov_shm_map, sov_shm_lock,            \
     sov_shm_barrier, sov_shm_unmap, sov_fetch, sov_unfetch}
static const sov_io_methods sov_plain_methods[3] = {SOV_PLAIN(1), SOV_PLAIN(2), SOV_PLAIN(3)};
static const sov_io_methods sov_wal_methods[3] = {SOV_WAL(1), SOV_WAL(2), SOV_WAL(3)};

static int sov_open(sov_vfs *vfs, const char *name, sov_file *f, int flags, int *out_flags) {
    sov_shim *p = (sov_shim *)f;
    sov_file *real = SOV_REAL(p);
    int rc, v;
    (void)vfs;
    memset(p, 0, sizeof(*p));
    p->kind = (flags & SOV_OPEN_MAIN_DB) ? SOV_MAIN_DB : (flags & SOV_OPEN_WAL) ? SOV_WAL : SOV_OTHER;
    real->pMethods = 0;
    rc = sov_wrapped->xOpen(sov_wrapped, name, real, flags, out_flags);
    if (real->pMethods == 0) {
        p->base.pMethods = 0; /* nothing opened: SQLite will not call xClose */
        return rc;
    }
    v = real->pMethods->iVersion;
    v = v < 1 ? 1 : (v > 3 ? 3 : v);
    if ((flags & SOV_OPEN_WAL) && sov_buffer_bytes > 0) {
        p->buf = (unsigned char *)malloc((size_t)sov_buffer_bytes);
        p->cap = p->buf != 0 ? sov_buffer_bytes : 0; /* no memory: write through */
        p->base.pMethods = &sov_wal_methods[v - 1];
    } else {
        p->base.pMethods = &sov_plain_methods[v - 1];
    }
    return rc;
}

typedef sov_vfs *(*sov_vfs_find_fn)(const char *);
typedef int (*sov_vfs_register_fn)(sov_vfs *, int);

/* Register the shim as ``name`` over the default VFS (once), gathering up to
 * ``buffer_bytes`` of appends and aligning synced WAL commits to ``sector_bytes`` (0:
 * not). 0 on success, else an SQLite error code, or -1 if there is no default VFS. */
static int sov_install(void *find_addr, void *register_addr, const char *name, int buffer_bytes,
                       int sector_bytes) {
    sov_vfs_find_fn find = (sov_vfs_find_fn)find_addr;
    sov_vfs_register_fn reg = (sov_vfs_register_fn)register_addr;
    sov_vfs *dflt;
    if (sov_wrapped != 0) return SOV_OK;
    dflt = find(0);
    if (dflt == 0 || dflt->iVersion < 3) return -1; /* the layout above is version 3's */
    memcpy(&sov_vfs_self, dflt, sizeof(sov_vfs_self));
    sov_vfs_self.pNext = 0;
    sov_vfs_self.zName = name;
    sov_vfs_self.szOsFile = SOV_REAL_OFFSET + dflt->szOsFile;
    sov_vfs_self.xOpen = sov_open;
    sov_buffer_bytes = buffer_bytes;
    sov_sector_bytes = sector_bytes;
    sov_wrapped = dflt;
    int rc = reg(&sov_vfs_self, 0);
    if (rc != SOV_OK) sov_wrapped = 0;
    return rc;
}

#endif
