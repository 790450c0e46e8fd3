#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
static int show(void *arg, int n, char **v, char **col) {
    (void)arg; (void)col;
    for (int i = 0; i < n; i++) printf("%s%s", i ? "|" : "", v[i] ? v[i] : "NULL");
    printf("\n");
    return 0;
}
static void run(sqlite3 *db, const char *sql) {
    char *err = 0;
    if (sqlite3_exec(db, sql, show, 0, &err) != SQLITE_OK) { printf("error: %s\n", err); exit(2); }
}
int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "delete";
    int rows = argc > 2 ? atoi(argv[2]) : 2000;
    char name[64], sql[256];
    snprintf(name, sizeof name, "test-%s.db", mode);
    sqlite3 *db;
    if (sqlite3_open(name, &db) != SQLITE_OK) { printf("open failed\n"); return 1; }
    snprintf(sql, sizeof sql, "PRAGMA journal_mode=%s;", mode);
    run(db, sql);
    run(db, "CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, k TEXT, v INTEGER);");
    run(db, "BEGIN;");
    for (int i = 0; i < rows; i++) {
        snprintf(sql, sizeof sql, "INSERT INTO t(k, v) VALUES('key%05d', %d);", i, i * 37 % 1000);
        run(db, sql);
    }
    run(db, "COMMIT;");
    run(db, "UPDATE t SET v = v + 1 WHERE v % 3 = 0;");
    run(db, "DELETE FROM t WHERE id % 7 = 0;");
    run(db, "CREATE INDEX IF NOT EXISTS tv ON t(v);");
    run(db, "SELECT count(*), sum(v), min(k), max(k) FROM t;");
    run(db, "SELECT v, count(*) FROM t GROUP BY v ORDER BY count(*) DESC, v LIMIT 5;");
    run(db, "PRAGMA integrity_check;");
    sqlite3_close(db);
    return 0;
}
