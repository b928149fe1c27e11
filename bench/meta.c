/*
 * bench/meta.c: metadata workload for bench/run.
 *
 * usage: meta DIR NFILES NDIRS
 *
 * Under DIR (created if missing), four phases, each timed on its own:
 *   create  mkdir NDIRS directories d0..d{NDIRS-1}, then create NFILES empty files
 *           spread round-robin over them (open O_CREAT|O_EXCL|O_WRONLY, close)
 *   stat    stat(2) every file by path
 *   list    opendir/readdir every directory (checks that NFILES names are seen)
 *   unlink  unlink every file, then rmdir every directory
 * Prints one line per phase: "<phase> <seconds>". Exits non-zero on any error.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what, const char *path)
{
	fprintf(stderr, "meta: %s %s: %s\n", what, path, strerror(errno));
	exit(1);
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: %s DIR NFILES NDIRS\n", argv[0]);
		return 2;
	}
	const char *base = argv[1];
	long nfiles = atol(argv[2]), ndirs = atol(argv[3]);
	if (nfiles <= 0 || ndirs <= 0) {
		fprintf(stderr, "meta: NFILES and NDIRS must be positive\n");
		return 2;
	}
	char path[4096];
	double t0, t;

	if (mkdir(base, 0755) != 0 && errno != EEXIST)
		die("mkdir", base);

	/* create */
	t0 = now();
	for (long d = 0; d < ndirs; d++) {
		snprintf(path, sizeof path, "%s/d%ld", base, d);
		if (mkdir(path, 0755) != 0)
			die("mkdir", path);
	}
	for (long i = 0; i < nfiles; i++) {
		snprintf(path, sizeof path, "%s/d%ld/f%ld", base, i % ndirs, i);
		int fd = open(path, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0644);
		if (fd < 0)
			die("create", path);
		if (close(fd) != 0)
			die("close", path);
	}
	t = now();
	printf("create %.6f\n", t - t0);

	/* stat */
	t0 = now();
	for (long i = 0; i < nfiles; i++) {
		struct stat st;
		snprintf(path, sizeof path, "%s/d%ld/f%ld", base, i % ndirs, i);
		if (stat(path, &st) != 0)
			die("stat", path);
		if (!S_ISREG(st.st_mode) || st.st_size != 0) {
			fprintf(stderr, "meta: %s: unexpected mode or size\n", path);
			return 1;
		}
	}
	t = now();
	printf("stat %.6f\n", t - t0);

	/* list */
	long seen = 0;
	t0 = now();
	for (long d = 0; d < ndirs; d++) {
		snprintf(path, sizeof path, "%s/d%ld", base, d);
		DIR *dir = opendir(path);
		if (!dir)
			die("opendir", path);
		struct dirent *de;
		errno = 0;
		while ((de = readdir(dir)) != NULL) {
			if (de->d_name[0] == 'f')
				seen++;
			errno = 0;
		}
		if (errno != 0)
			die("readdir", path);
		closedir(dir);
	}
	t = now();
	if (seen != nfiles) {
		fprintf(stderr, "meta: readdir saw %ld files, expected %ld\n", seen, nfiles);
		return 1;
	}
	printf("list %.6f\n", t - t0);

	/* unlink */
	t0 = now();
	for (long i = 0; i < nfiles; i++) {
		snprintf(path, sizeof path, "%s/d%ld/f%ld", base, i % ndirs, i);
		if (unlink(path) != 0)
			die("unlink", path);
	}
	for (long d = 0; d < ndirs; d++) {
		snprintf(path, sizeof path, "%s/d%ld", base, d);
		if (rmdir(path) != 0)
			die("rmdir", path);
	}
	t = now();
	printf("unlink %.6f\n", t - t0);
	if (rmdir(base) != 0)
		die("rmdir", base);
	return 0;
}
