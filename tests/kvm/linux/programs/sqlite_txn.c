/* Numbered SQLite transactions: commit transaction i (a row with n = i, in a database *file*),
 * then print i, for i = 1..N; at the end print what the database holds. Under `protect --exec`
 * with the primary killed at random moments, the printed numbers must continue with no gap and
 * no repeat, and the final line must agree with them (the file system is in guest memory, so
 * the database and the output come from the same checkpoint).
 * Each line is "i rows": the number, and how many rows the database holds right after that
 * commit (always i: the database and the output come from the same state at every line).
 * Usage: sqlite_txn [N [journal_mode [exit_status [pause_us]]]]; pause_us sleeps after each
 * line, so a test knows a lower bound of the time left (N = 0: go on forever). */
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static sqlite3 *db;

static void exec(const char *sql) {
    char *err = 0;
    if (sqlite3_exec(db, sql, 0, 0, &err) != SQLITE_OK) {
        fprintf(stderr, "error: %s (%s)\n", err, sql);
        exit(2);
    }
}

static long long one(const char *sql) {
    sqlite3_stmt *st;
    long long v = -1;
    if (sqlite3_prepare_v2(db, sql, -1, &st, 0) != SQLITE_OK) exit(3);
    if (sqlite3_step(st) == SQLITE_ROW) v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return v;
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 2000;
    const char *mode = argc > 2 ? argv[2] : "wal";
    int status = argc > 3 ? atoi(argv[3]) : 0;
    long pause_us = argc > 4 ? atol(argv[4]) : 0;
    struct timespec pause = {pause_us / 1000000, pause_us % 1000000 * 1000};
    char sql[128];
    if (sqlite3_open("txn.db", &db) != SQLITE_OK) return 1;
    snprintf(sql, sizeof sql, "PRAGMA journal_mode=%s;", mode);
    exec(sql);
    exec("PRAGMA synchronous=FULL;");
    exec("CREATE TABLE t(n INTEGER PRIMARY KEY, sq INTEGER);");
    for (int i = 1; n == 0 || i <= n; i++) {
        snprintf(sql, sizeof sql, "BEGIN; INSERT INTO t VALUES(%d, %lld); COMMIT;", i,
                 (long long)i * i);
        exec(sql);
        printf("%d %lld\n", i, one("SELECT count(*) FROM t;"));
        fflush(stdout);
        if (pause_us) nanosleep(&pause, 0);
    }
    printf("rows %lld max %lld sum %lld check %lld\n", one("SELECT count(*) FROM t;"),
           one("SELECT max(n) FROM t;"), one("SELECT sum(sq) FROM t;"),
           one("SELECT count(*) FROM t WHERE sq != n * n;"));
    sqlite3_close(db);
    return status;
}
