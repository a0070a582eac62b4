// The gateway's public HTTP API, as the UI calls it: the API key from the session, JSON in and out, and the
// gateway's error objects turned into exceptions that keep the field at fault.

const KEY = "zinfer.apiKey";

export const session = {
  get key() { return sessionStorage.getItem(KEY); },
  set key(value) { if (value) sessionStorage.setItem(KEY, value); else sessionStorage.removeItem(KEY); },
  who: null, // {name, role} of the key, from /v1/whoami
  get admin() { return this.who?.role === "admin"; },
};

export class ApiError extends Error {
  constructor(message, status, field, problems) {
    super(message);
    this.status = status;
    this.field = field;
    this.problems = problems || []; // [{field, message}]: every field at fault, when the server names several
  }
}

export async function api(path, { method = "GET", body } = {}) {
  const headers = {};
  if (session.key) headers.Authorization = `Bearer ${session.key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await response.text();
  let data = text;
  try { data = text ? JSON.parse(text) : null; } catch { /* a plain-text answer */ }
  if (!response.ok) {
    const error = data?.error;
    throw new ApiError(error?.message || data?.detail || `HTTP ${response.status}`, response.status, error?.param,
                       error?.problems);
  }
  return data;
}
