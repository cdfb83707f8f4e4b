// Local state in IndexedDB: the session, this device's MLS secrets (signature key,
// KeyPackage private keys), each conversation's MLS group state, and the messages this
// device decrypted (MLS keys are deleted after use, so what was read is kept here).
// One object store of key -> value; a transaction writes several keys or none, so the
// group state and what it produced (a message, the applied seq) never disagree.
const DB_NAME = "sovereign";
const STORE = "kv";

let dbPromise: Promise<IDBDatabase> | null = null;

function open(): Promise<IDBDatabase> {
  dbPromise ??= new Promise((resolve, reject) => {
    const req = indexedDB.open(DB_NAME, 1);
    req.onupgradeneeded = () => req.result.createObjectStore(STORE);
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
  return dbPromise;
}

function done(tx: IDBTransaction): Promise<void> {
  return new Promise((resolve, reject) => {
    tx.oncomplete = () => resolve();
    tx.onerror = () => reject(tx.error);
    tx.onabort = () => reject(tx.error ?? new Error("transaction aborted"));
  });
}

export async function get<V>(key: string): Promise<V | undefined> {
  const db = await open();
  return new Promise((resolve, reject) => {
    const req = db.transaction(STORE).objectStore(STORE).get(key);
    req.onsuccess = () => resolve(req.result as V | undefined);
    req.onerror = () => reject(req.error);
  });
}

/** Write (value) or delete (undefined) several keys in one transaction. */
export async function write(entries: Record<string, unknown>): Promise<void> {
  const db = await open();
  const tx = db.transaction(STORE, "readwrite");
  const s = tx.objectStore(STORE);
  for (const [k, v] of Object.entries(entries)) {
    if (v === undefined) s.delete(k);
    else s.put(v, k);
  }
  await done(tx);
}

/** Values whose keys start with `prefix`, in key order (last `limit` if `fromEnd`). */
export async function range<V>(prefix: string, opts: { limit?: number; before?: string } = {}): Promise<V[]> {
  const db = await open();
  const upper = opts.before ?? prefix + "\uffff";
  const keyRange = IDBKeyRange.bound(prefix, upper, false, opts.before !== undefined);
  return new Promise((resolve, reject) => {
    const out: V[] = [];
    const req = db.transaction(STORE).objectStore(STORE).openCursor(keyRange, "prev");
    req.onsuccess = () => {
      const c = req.result;
      if (!c || (opts.limit !== undefined && out.length >= opts.limit)) {
        resolve(out.reverse());
        return;
      }
      out.push(c.value as V);
      c.continue();
    };
    req.onerror = () => reject(req.error);
  });
}

export async function keys(prefix: string): Promise<string[]> {
  const db = await open();
  return new Promise((resolve, reject) => {
    const req = db
      .transaction(STORE)
      .objectStore(STORE)
      .getAllKeys(IDBKeyRange.bound(prefix, prefix + "\uffff"));
    req.onsuccess = () => resolve(req.result as string[]);
    req.onerror = () => reject(req.error);
  });
}

export async function clearAll(): Promise<void> {
  const db = await open();
  const tx = db.transaction(STORE, "readwrite");
  tx.objectStore(STORE).clear();
  await done(tx);
}
