"""A FUSE passthrough filesystem that refuses hard links, as Colab's Google Drive mount does.

  python tests/drive_fs.py SOURCE MOUNTPOINT      # serves SOURCE at MOUNTPOINT until unmounted

Reads and writes are `pread`/`pwrite` on the file handle: FUSE calls them from several threads,
and a seek then a read would let one thread's seek move another's read (Orbax reads checkpoints
from several threads). Used by tests/colab.py's `drive_mount`.
"""
import errno
import os
import sys

import mfusepy


class NoLinksPassthrough(mfusepy.Operations):
    """SOURCE's files, served with every operation a run uses except link(), which fails with
    ENOSYS ("Function not implemented") as on Drive."""
    use_ns = True

    def __init__(self, source: str):
        self.source = os.path.realpath(source)

    def _real(self, path: str) -> str:
        return os.path.join(self.source, path.lstrip('/'))

    def link(self, target, source):
        raise mfusepy.FuseOSError(errno.ENOSYS)

    def access(self, path, amode):
        if not os.access(self._real(path), amode):
            raise mfusepy.FuseOSError(errno.EACCES)
        return 0

    def chmod(self, path, mode):
        os.chmod(self._real(path), mode)
        return 0

    def chown(self, path, uid, gid):
        os.chown(self._real(path), uid, gid)
        return 0

    def getattr(self, path, fh=None):
        status = os.fstat(fh) if fh is not None else os.lstat(self._real(path))
        return {key: getattr(status, key) for key in (
            'st_mode', 'st_nlink', 'st_uid', 'st_gid', 'st_size', 'st_atime_ns', 'st_mtime_ns', 'st_ctime_ns')} | {
            'st_atime': status.st_atime_ns, 'st_mtime': status.st_mtime_ns, 'st_ctime': status.st_ctime_ns}

    def readdir(self, path, fh):
        return ['.', '..', *os.listdir(self._real(path))]

    def readlink(self, path):
        return os.readlink(self._real(path))

    def mkdir(self, path, mode):
        os.mkdir(self._real(path), mode)
        return 0

    def rmdir(self, path):
        os.rmdir(self._real(path))
        return 0

    def unlink(self, path):
        os.unlink(self._real(path))
        return 0

    def symlink(self, target, source):
        os.symlink(source, self._real(target))
        return 0

    def rename(self, old, new):
        os.rename(self._real(old), self._real(new))
        return 0

    def statfs(self, path):
        status = os.statvfs(self._real(path))
        return {key: getattr(status, key) for key in (
            'f_bavail', 'f_bfree', 'f_blocks', 'f_bsize', 'f_favail', 'f_ffree', 'f_files', 'f_flag',
            'f_frsize', 'f_namemax')}

    def truncate(self, path, length, fh=None):
        if fh is not None:
            os.ftruncate(fh, length)
        else:
            os.truncate(self._real(path), length)
        return 0

    def utimens(self, path, times=None):
        os.utime(self._real(path), ns=times)
        return 0

    def open(self, path, flags):
        return os.open(self._real(path), flags)

    def create(self, path, mode, flags):
        # O_EXCL kept: the kernel checks existence first, this makes the create itself exclusive.
        return os.open(self._real(path), flags | os.O_CREAT, mode)

    def read(self, path, size, offset, fh):
        return os.pread(fh, size, offset)

    def write(self, path, data, offset, fh):
        return os.pwrite(fh, data, offset)

    def flush(self, path, fh):
        return 0

    def fsync(self, path, datasync, fh):
        (os.fdatasync if datasync else os.fsync)(fh)
        return 0

    def release(self, path, fh):
        os.close(fh)
        return 0


if __name__ == '__main__':
    source, mountpoint = sys.argv[1:]
    mfusepy.FUSE(NoLinksPassthrough(source), mountpoint, foreground=True, nothreads=False)
