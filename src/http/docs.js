// "Try it" for /docs: a form per operation, built from /openapi.json, that sends the request from
// this page (same origin) with the API key typed above, and shows the answer. No other origin is
// contacted; the key stays in this tab's sessionStorage.
"use strict";
(function () {
  const keyInput = document.getElementById("api-key");
  if (keyInput) {
    keyInput.value = sessionStorage.getItem("klr-docs-key") || "";
    keyInput.addEventListener("input", () => sessionStorage.setItem("klr-docs-key", keyInput.value));
  }
  const SAMPLE_TASK = {
    subject_image_list: [
      { subject_image: "https://example.com/a.png" },
      { subject_image: "https://example.com/b.png" }
    ],
    prompt: "two cats at a tea party",
    n: 1,
    aspect_ratio: "1:1"
  };

  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function resolve(doc, schema) {
    if (schema && schema.$ref) {
      const name = schema.$ref.split("/").pop();
      return (doc.components && doc.components.schemas && doc.components.schemas[name]) || {};
    }
    return schema || {};
  }

  function exampleBody(doc, method, path, content) {
    if (method === "post" && path === "/v1/tasks") return SAMPLE_TASK;
    if (content.example !== undefined) return content.example;
    const s = resolve(doc, content.schema);
    if (s.example !== undefined) return s.example;
    return {};
  }

  async function send(form, op, method, path, out) {
    out.textContent = "…";
    let url = path;
    const query = new URLSearchParams();
    const headers = {};
    for (const p of op.parameters || []) {
      const v = form.elements["p-" + p.in + "-" + p.name].value;
      if (p.in === "path") {
        url = url.replace("{" + p.name + "}", encodeURIComponent(v));
      } else if (v !== "" && p.in === "query") {
        query.append(p.name, v);
      } else if (v !== "" && p.in === "header") {
        headers[p.name] = v;
      }
    }
    if ([...query].length) url += "?" + query.toString();
    const key = keyInput ? keyInput.value.trim() : "";
    if (key) headers["Authorization"] = "Bearer " + key;
    const init = { method: method.toUpperCase(), headers };
    const body = form.elements["body"];
    if (body) {
      init.body = body.value;
      headers["Content-Type"] = "application/json";
    }
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), 35000);
    init.signal = abort.signal;
    try {
      const r = await fetch(url, init);
      const head = r.status + " " + r.statusText + "\n" +
        ["content-type", "location", "retry-after", "etag", "preference-applied"]
          .filter((h) => r.headers.get(h))
          .map((h) => h + ": " + r.headers.get(h))
          .join("\n");
      const type = r.headers.get("content-type") || "";
      out.textContent = "";
      out.append(el("pre", { class: "status" }, head));
      if (type.startsWith("image/")) {
        const img = el("img", { alt: "the answer's image" });
        img.src = URL.createObjectURL(await r.blob());
        out.append(img);
      } else if (type.startsWith("text/event-stream") && r.body) {
        const pre = el("pre", { class: "body" }, "");
        out.append(pre);
        const reader = r.body.getReader();
        const dec = new TextDecoder();
        for (;;) {
          const { done, value } = await reader.read();
          if (done) break;
          pre.textContent += dec.decode(value);
        }
      } else {
        const text = await r.text();
        let shown = text;
        try { shown = JSON.stringify(JSON.parse(text), null, 2); } catch (_) { /* not JSON */ }
        out.append(el("pre", { class: "body" }, shown));
      }
    } catch (e) {
      out.textContent = "request failed: " + e;
    } finally {
      clearTimeout(timer);
    }
  }

  fetch("/openapi.json").then((r) => r.json()).then((doc) => {
    for (const div of document.querySelectorAll(".op[data-method]")) {
      const method = div.dataset.method;
      const path = div.dataset.path;
      const op = doc.paths[path] && doc.paths[path][method];
      if (!op) continue;
      const details = el("details", { class: "try" });
      details.append(el("summary", {}, "Try it"));
      const form = el("form", {});
      for (const p of op.parameters || []) {
        const id = div.id + "-" + p.in + "-" + p.name;
        form.append(el("label", { for: id }, p.name + " (" + p.in + ")" + (p.required ? " *" : "")));
        const input = el("input", { id, name: "p-" + p.in + "-" + p.name });
        if (p.required) input.required = true;
        if (p.example !== undefined) input.value = p.example;
        form.append(input);
      }
      const content = op.requestBody && op.requestBody.content && op.requestBody.content["application/json"];
      if (content) {
        const id = div.id + "-body";
        form.append(el("label", { for: id }, "body (JSON)"));
        const ta = el("textarea", { id, name: "body", spellcheck: "false" });
        ta.value = JSON.stringify(exampleBody(doc, method, path, content), null, 2);
        form.append(ta);
      }
      form.append(el("button", { type: "submit" }, "Send " + method.toUpperCase() + " " + path));
      const out = el("div", { class: "answer", "aria-live": "polite" });
      form.addEventListener("submit", (e) => {
        e.preventDefault();
        send(form, op, method, path, out);
      });
      details.append(form, out);
      div.append(details);
    }
    document.body.dataset.tryReady = "yes";
  }).catch((e) => {
    document.body.dataset.tryReady = "failed: " + e;
  });
})();
