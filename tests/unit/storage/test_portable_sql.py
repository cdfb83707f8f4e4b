"""Store SQL is written once for every engine (``sovereign/storage/engines.py``).

Three checks keep it so:

1. No string literal in a store module uses a construct only SQLite accepts (or only
   PostgreSQL does: such SQL must come from the engine, like ``ENGINE.greatest``).
2. Inside ``ON CONFLICT … DO UPDATE SET``, the existing row's columns are qualified with
   the table name: PostgreSQL finds a bare ``col`` ambiguous with ``excluded.col``.
3. Every statement found in the store modules compiles against the migrated SQLite
   schema (what they do is covered by the stores' own tests).

The store modules are every module of ``sovereign.storage`` except ``engines`` (where
dialects may differ), ``database`` (the SQLite connection layer: pragmas, the
writer's transactions, backup, the migration runner), ``postgres`` (PostgreSQL's) and
``migrate`` (the SQLite -> PostgreSQL copy, which reads each engine's catalogue).
Migrations shared by every engine (``NNNN_name.sql``, no engine suffix) get the same
scan. Every store statement is also prepared on PostgreSQL (``test_postgres.py``).
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

import sovereign.storage
from sovereign.storage.database import (
    _COMMENTS,
    _MIGRATION_NAME,
    apply_migrations,
    default_migrations,
    load_migrations,
)

NOT_STORES = {"engines", "database", "postgres", "migrate", "walvfs", "walvfs_twin"}
STORE_MODULES = sorted(
    m.name
    for m in pkgutil.iter_modules(sovereign.storage.__path__)
    if m.name not in NOT_STORES and not m.ispkg
)

_I = re.IGNORECASE
_SQLITE_FUNCTIONS = (
    "ifnull|iif|instr|group_concat|printf|strftime|julianday|unixepoch|datetime|randomblob"
    "|zeroblob|last_insert_rowid|changes|total_changes|typeof|likely|unlikely|likelihood"
)
#: (pattern, what to write instead). ``||`` is absent on purpose: it is standard SQL
#: string concatenation and means the same in SQLite and PostgreSQL.
FORBIDDEN: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\bINSERT\s+OR\s+\w+", _I), "INSERT … ON CONFLICT (…) DO NOTHING / DO UPDATE"),
    (re.compile(r"\bREPLACE\s+INTO\b", _I), "INSERT … ON CONFLICT (…) DO UPDATE"),
    (re.compile(r"\b(?:GREATEST|LEAST)\s*\(", _I), "ENGINE.greatest (PostgreSQL-only name)"),
    (re.compile(rf"\b(?:{_SQLITE_FUNCTIONS})\s*\(", _I), "a function both engines have"),
    (re.compile(r"\bsqlite_\w+", _I), "nothing SQLite-internal"),
    (re.compile(r"\b(?:_rowid_|rowid|oid)\b", _I), "the primary key (rowid is SQLite's)"),
    (re.compile(r"\bPRAGMA\b", _I), "engines.py (connection set-up)"),
    (re.compile(r"\bBEGIN\s+(?:IMMEDIATE|EXCLUSIVE|DEFERRED)\b", _I), "Database (transactions)"),
    (re.compile(r"\bAUTOINCREMENT\b", _I), "an engine-specific migration"),
    (re.compile(r"\bSTRICT\b", _I), "an engine-specific migration"),
    (re.compile(r"\bWITHOUT\s+ROWID\b", _I), "an engine-specific migration"),
    (re.compile(r"\bCOLLATE\s+NOCASE\b", _I), "lower() or a key computed in Python"),
    (re.compile(r"\bLIMIT\s+-1\b", _I), "no LIMIT"),
    (re.compile(r"\bLIMIT\s+[^\s,]+\s*,", _I), "LIMIT ? OFFSET ?"),
    (re.compile(r"\b(?:GLOB|REGEXP|ILIKE)\b", _I), "lower(col) LIKE lower(?)"),
    (
        re.compile(r"\bIS\s+(?!NULL\b|NOT\s+NULL\b)(?:NOT\s+)?\S", _I),
        "= / <> (IS on values is SQLite's)",
    ),
    (re.compile(r"\b(?:TRUE|FALSE)\b", _I), "1 / 0 (booleans are integers in every schema)"),
    (re.compile(r"=="), "= (== is SQLite's)"),
    (re.compile(r"::"), "CAST(x AS type) (:: is PostgreSQL's)"),
    (re.compile(r"\bx'", _I), "a bound parameter (x'…' blob literals are SQLite's)"),
    (re.compile(r'"'), "'…' for strings; SQLite may read \"…\" as a string, PostgreSQL never"),
]
_SCALAR_MIN_MAX = re.compile(r"\b(?:max|min)\s*\(", _I)
_LIKE = re.compile(r"\bLIKE\b", _I)
_PORTABLE_LIKE = re.compile(r"\blower\([\w.]+\)\s+(?:NOT\s+)?LIKE\s+lower\(", _I)
_STATEMENT = re.compile(r"^\s*(?:SELECT|INSERT|UPDATE|DELETE|WITH)\s")  # SQL is upper case


def sqlite_only(text: str) -> list[str]:
    """What in ``text`` (SQL, or a piece of it) only one engine accepts."""
    sql = _COMMENTS.sub(" ", text)
    found = [f"{m.group(0)!r}: use {fix}" for pat, fix in FORBIDDEN for m in pat.finditer(sql)]
    for m in _SCALAR_MIN_MAX.finditer(sql):
        depth = 0
        for ch in sql[m.end() - 1 :]:
            depth += (ch == "(") - (ch == ")")
            if depth == 0 or (depth == 1 and ch == ","):
                break
        if depth != 0:  # two arguments, or cut off where a piece of SQL ends
            found.append(f"{m.group(0)!r} with two arguments: use ENGINE.greatest")
    if len(_LIKE.findall(sql)) != len(_PORTABLE_LIKE.findall(sql)):
        found.append("LIKE: write lower(col) LIKE lower(?) (SQLite ignores ASCII case)")
    return found


_WORD = re.compile(r"(?<![\w.])([A-Za-z_]\w*)\b(?!\s*[.(])")
_KEYWORDS = {"null", "and", "or", "not", "case", "when", "then", "else", "end", "is", "in"}
_DO_UPDATE = re.compile(r"\bDO\s+UPDATE\s+SET\b(.*?)(?:\bRETURNING\b|$)", _I | re.DOTALL)


def bare_upsert_columns(sql: str) -> list[str]:
    """Unqualified column names read in ``DO UPDATE SET`` expressions or its WHERE."""
    bare: list[str] = []
    for m in _DO_UPDATE.finditer(re.sub(r"'[^']*'", "''", sql)):
        sets, _, where = re.sub(r"\bWHERE\b", "\0", m.group(1), count=1, flags=_I).partition("\0")
        exprs, depth, start = [where], 0, 0
        for i, ch in enumerate(sets + ","):
            depth += (ch == "(") - (ch == ")")
            if ch == "," and depth == 0:
                exprs.append(sets[start:i].partition("=")[2])
                start = i + 1
        bare += [w for e in exprs for w in _WORD.findall(e) if w.lower() not in _KEYWORDS]
    return bare


# -- what the store modules contain ---------------------------------------------------


def _source(name: str) -> tuple[ModuleType, ast.Module]:
    module = importlib.import_module(f"sovereign.storage.{name}")
    assert module.__file__ is not None
    return module, ast.parse(Path(module.__file__).read_text(encoding="utf-8"))


_DEFS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _docstrings(tree: ast.Module) -> set[int]:
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, _DEFS))]
    return {
        id(n.body[0].value)
        for n in nodes
        if n.body
        and isinstance(n.body[0], ast.Expr)
        and isinstance(n.body[0].value, ast.Constant)
        and isinstance(n.body[0].value.value, str)
    }


def literals(name: str) -> Iterator[str]:
    """Every string literal of a module but its docstrings (f-strings: their text parts)."""
    _, tree = _source(name)
    skip = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            yield node.value


def statements(name: str) -> Iterator[str]:
    """Complete statements: literals, f-strings whose every placeholder is a module-level
    string (``_COLS``), and module-level strings (with engine SQL spliced in). An IN-list
    template for ``_util.rows_in`` (``IN ({marks})``) is checked with one id."""
    for sql in _statements(name):
        yield sql.replace("({marks})", "(?)")


def _statements(name: str) -> Iterator[str]:
    module, tree = _source(name)
    consts = {k: v for k, v in vars(module).items() if isinstance(v, str)}
    # Not statements on their own: docstrings, f-string parts, and the pieces of
    # "..." + ENGINE.x(...) (the module constant they build is checked instead).
    parts_of = _docstrings(tree)
    for n in ast.walk(tree):
        if isinstance(n, ast.BinOp):
            parts_of |= {id(n.left), id(n.right)}
        elif isinstance(n, ast.JoinedStr):
            parts_of |= {id(v) for v in n.values}
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            parts: list[str] = []
            for v in node.values:
                if isinstance(v, ast.Constant):
                    parts.append(str(v.value))
                elif (
                    isinstance(v, ast.FormattedValue)
                    and isinstance(v.value, ast.Name)
                    and v.value.id in consts
                    and v.format_spec is None
                ):
                    parts.append(consts[v.value.id])
                else:
                    break  # a placeholder filled per call: left to the stores' tests
            else:
                yield "".join(parts)
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in parts_of
            and _STATEMENT.match(node.value)
        ):
            yield node.value
    yield from (v for v in consts.values() if _STATEMENT.match(v))


# -- the checks -------------------------------------------------------------------------


def test_every_store_module_is_checked() -> None:
    assert {"messaging", "users", "sessions", "keypackages", "settings"} <= set(STORE_MODULES)


@pytest.mark.parametrize("name", STORE_MODULES)
def test_store_sql_has_no_single_engine_constructs(name: str) -> None:
    problems = [
        f"{text.strip()[:70]!r} -> {p}" for text in literals(name) for p in sqlite_only(text)
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", STORE_MODULES)
def test_upserts_qualify_the_existing_row(name: str) -> None:
    problems = [(sql, bare) for sql in statements(name) if (bare := bare_upsert_columns(sql))]
    assert not problems, problems


def test_shared_migrations_have_no_single_engine_constructs() -> None:
    for entry in default_migrations().iterdir():
        m = _MIGRATION_NAME.match(entry.name)
        if m is not None and m.group(3) is None:
            problems = sqlite_only(entry.read_text(encoding="utf-8"))
            assert not problems, (entry.name, problems)


@pytest.fixture(scope="module")
def schema() -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    apply_migrations(conn, load_migrations(default_migrations(), "sqlite"))
    yield conn
    conn.close()


@pytest.mark.parametrize("name", STORE_MODULES)
def test_every_statement_compiles_on_sqlite(name: str, schema: sqlite3.Connection) -> None:
    found = list(dict.fromkeys(statements(name)))
    for sql in found:
        try:
            schema.execute("EXPLAIN " + sql, [None] * sql.count("?"))
        except sqlite3.Error as exc:
            pytest.fail(f"{name}: {exc}: {sql}")
    sql_modules = {"challenges", "credentials", "invites", "keypackages", "messaging"}
    sql_modules |= {"sessions", "settings", "users"}
    assert found or name not in sql_modules


def test_statements_include_engine_built_constants() -> None:
    found = list(statements("messaging"))
    assert any("max(cursors.acked_seq, excluded.acked_seq)" in s for s in found)
    assert any(s.startswith("SELECT conversation_id, title") for s in found)
    assert any("FROM credentials WHERE credential_id = ?" in s for s in statements("credentials"))


# -- the detectors themselves -------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT OR IGNORE INTO t (a) VALUES (?)",
        "insert or replace into t (a) values (?)",
        "REPLACE INTO t (a) VALUES (?)",
        "UPDATE t SET a = max(a, ?) WHERE k = ?",
        "UPDATE t SET a = MIN(a, (SELECT 1)) WHERE k = ?",
        " DO UPDATE SET a = max(",  # a piece cut off after max(
        "UPDATE t SET a = GREATEST(a, ?)",
        "SELECT ifnull(a, 0) FROM t",
        "SELECT strftime('%s', 'now')",
        "SELECT rowid FROM t",
        "SELECT a FROM t WHERE b LIKE ?",
        "SELECT a FROM t WHERE lower(b) LIKE ? OR c LIKE ?",
        "SELECT a FROM t WHERE b GLOB ?",
        "SELECT a FROM t LIMIT -1 OFFSET ?",
        "SELECT a FROM t LIMIT 5, 10",
        "SELECT a FROM t WHERE b IS ?",
        "SELECT a FROM t WHERE b == ?",
        "SELECT a FROM t WHERE flag = TRUE",
        'SELECT a FROM t WHERE b = "x"',
        "SELECT a::text FROM t",
        "CREATE TABLE t (a INTEGER PRIMARY KEY AUTOINCREMENT) STRICT",
        "CREATE TABLE t (a TEXT COLLATE NOCASE) WITHOUT ROWID",
        "PRAGMA foreign_keys = ON",
        "SELECT name FROM sqlite_master",
    ],
)
def test_detector_flags(sql: str) -> None:
    assert sqlite_only(sql), sql


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT max(seq), min(seq) FROM events WHERE a = ?",
        "SELECT COALESCE(max(x), 0) FROM t",
        "INSERT INTO t (a) VALUES (?) ON CONFLICT (a) DO NOTHING",
        "SELECT a FROM t WHERE lower(b) LIKE lower(?) ESCAPE '\\' OR lower(t.c) NOT LIKE lower(?)",
        "SELECT a FROM t WHERE b IS NULL AND c IS NOT NULL AND d <> ? AND e != ?",
        "SELECT a || '-' || b FROM t LIMIT ? OFFSET ?",
        "-- PRAGMA in a comment\nSELECT 1",
    ],
)
def test_detector_passes(sql: str) -> None:
    assert not sqlite_only(sql), sql


def test_bare_upsert_column_detector() -> None:
    assert bare_upsert_columns(
        "INSERT INTO c (k, a) VALUES (?, ?) ON CONFLICT (k) DO UPDATE SET a = max(a, excluded.a)"
    ) == ["a"]
    assert bare_upsert_columns(
        "INSERT INTO c (k, a) VALUES (?, ?) ON CONFLICT (k) DO UPDATE SET a = excluded.a"
        " WHERE excluded.a > a RETURNING k"
    ) == ["a"]
    ok = (
        "INSERT INTO c (k, a, b) VALUES (?, ?, ?) ON CONFLICT (k) DO UPDATE SET"
        " a = max(c.a, excluded.a), b = NULL, k = CASE WHEN c.a > 0 THEN 'x' ELSE c.k END"
        " RETURNING k, a"
    )
    assert bare_upsert_columns(ok) == []
