// The admin API over fetch: JSON in, JSON out, errors as ApiError with a readable message.
export class ApiError extends Error {
  constructor(status, code, message, field) {
    super(message);
    this.status = status;
    this.code = code;
    this.field = field;
  }
}

export async function api(method, path, body) {
  const init = { method, headers: {}, credentials: "same-origin" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch("/admin/api" + path, init);
  } catch {
    throw new ApiError(0, 0, "The server cannot be reached. Is it running?");
  }
  if (resp.status === 204) return null;
  let data = null;
  try {
    data = await resp.json();
  } catch {
    data = null;
  }
  if (!resp.ok) {
    const e = (data && data.error) || {};
    throw new ApiError(resp.status, e.code || resp.status, e.message || `Request failed (${resp.status})`, e.field);
  }
  return data;
}

export const GET = (p) => api("GET", p);
export const PUT = (p, b) => api("PUT", p, b);
export const POST = (p, b) => api("POST", p, b ?? {});
export const DELETE = (p) => api("DELETE", p);
