"""A small stand-in for the Hugging Face Hub, for tests: the part of the HTTP API that the real
`huggingface_hub` client (and timm through it) uses to create a model repo, upload files, read
them back and inspect a repo. Standard library only; state lives in memory.

    server = HubServer().start()              # http://127.0.0.1:<free port>
    env = {"HF_ENDPOINT": server.url, ...}    # set before huggingface_hub is imported
    server.fail(500)                          # every request answers 500 until server.fail(None)
    server.stop()                             # the Hub is down: connections are refused

Implemented (model repos only):
    POST /api/repos/create                           create (409 + url if it exists)
    GET  /api/whoami-v2                              the user a token belongs to
    POST /api/validate-yaml                          model card metadata check
    GET  /api/models/<repo>[/revision/<rev>]         model info (sha, siblings, cardData, tags)
    GET  /api/models/<repo>/refs                     branches
    GET  /api/models/<repo>/tree/<rev>[/<path>]      file listing
    POST /api/models/<repo>/branch/<branch>          create a branch
    POST /api/models/<repo>/preupload/<rev>          always "regular" uploads (no LFS, no Xet)
    POST /api/models/<repo>/commit/<rev>             NDJSON commit: header, file, deletedFile, deletedFolder
    HEAD/GET /<repo>/resolve/<rev>/<path>            file with ETag, X-Repo-Commit, Content-Length, Range

Errors carry the X-Error-Code header (RepoNotFound, RevisionNotFound, EntryNotFound) that
`huggingface_hub` turns into its typed exceptions. Any non-empty bearer token is accepted and belongs
to the user `HubServer.USER`; writes need one, reads of private repos too.
"""
import base64
import hashlib
import http.server
import json
import threading
import time
from urllib.parse import parse_qs, unquote, urlsplit


def git_blob_id(content):
    """The git object id of a file: what the Hub returns as ETag/oid of a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def card_metadata(readme):
    """The YAML front matter of a README.md as a dict (None without one; ValueError if invalid)."""
    import yaml
    text = readme.decode() if isinstance(readme, bytes) else readme
    if not text.startswith("---"):
        return None
    parts = text.split("\n---", 1)
    if len(parts) < 2:
        raise ValueError("the metadata block is not closed by '---'")
    data = yaml.safe_load(parts[0][3:])
    if data is not None and not isinstance(data, dict):
        raise ValueError("metadata must be a YAML mapping")
    return data


class Repo:
    def __init__(self, repo_id, private):
        self.repo_id, self.private = repo_id, private
        self.commits = {}   # oid -> {"files": {path: blob oid}, "parent", "summary", "date"}
        self.branches = {}  # name -> commit oid
        self.created = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())

    def commit(self, branch, files, summary, blobs):
        parent = self.branches.get(branch)
        tree = dict(self.commits[parent]["files"]) if parent else {}
        tree.update(files)
        for path in [p for p in tree if tree[p] is None]:
            del tree[path]
        oid = hashlib.sha1(json.dumps([parent, summary, sorted(tree.items()), time.time_ns()]).encode()).hexdigest()
        self.commits[oid] = {"files": tree, "parent": parent, "summary": summary,
                             "date": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())}
        self.branches[branch] = oid
        return oid

    def resolve(self, revision):
        """Commit oid of a branch name or (a prefix of) a commit oid, or None."""
        if revision in self.branches:
            return self.branches[revision]
        matches = [oid for oid in self.commits if len(revision) >= 7 and oid.startswith(revision)]
        return matches[0] if len(matches) == 1 else None


class HubError(Exception):
    def __init__(self, status, message, code=None, headers=None):
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers or {}


class HubServer:
    USER = "hvp-tester"

    def __init__(self, host="127.0.0.1", port=0):
        self.repos, self.blobs = {}, {}        # repo id -> Repo, blob oid -> bytes
        self.requests = []                     # (method, path, had a bearer token), in arrival order
        self.tokens_seen = set()
        self.fail_status, self.fail_methods = None, None
        self.lock = threading.RLock()
        self.httpd = http.server.ThreadingHTTPServer((host, port), self._handler_class())
        self.httpd.daemon_threads = True
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        self.thread = None

    # --- control, from the test -----------------------------------------------------------------

    def start(self):
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def stop(self):
        if self.thread is not None:
            self.httpd.shutdown()
            self.thread.join()
            self.thread = None
        self.httpd.server_close()

    def fail(self, status=500, methods=None):
        """Answer every request (or only those with a method in `methods`) with `status`; None = heal."""
        self.fail_status, self.fail_methods = status, set(methods) if methods else None

    def add_files(self, repo_id, files, branch="main", private=False, summary="seed"):
        """Put files ({path: bytes}) into a repo directly, creating it if needed. Returns the commit oid."""
        with self.lock:
            repo = self._create(repo_id, private)
            if branch not in repo.branches:
                repo.branches[branch] = repo.branches["main"]
            oids = {}
            for path, content in files.items():
                self.blobs[git_blob_id(content)] = content
                oids[path] = git_blob_id(content)
            return repo.commit(branch, oids, summary, self.blobs)

    def file(self, repo_id, path, revision="main"):
        """Content of a file in a repo at a revision (bytes), or None."""
        with self.lock:
            repo = self.repos.get(repo_id)
            commit = repo and repo.resolve(revision)
            oid = commit and repo.commits[commit]["files"].get(path)
            return self.blobs.get(oid) if oid else None

    def commits(self, repo_id, branch="main"):
        """Commit summaries of a branch, newest first."""
        with self.lock:
            repo, out = self.repos[repo_id], []
            oid = repo.branches.get(branch)
            while oid:
                out.append(repo.commits[oid]["summary"])
                oid = repo.commits[oid]["parent"]
            return out

    # --- the API --------------------------------------------------------------------------------

    def _create(self, repo_id, private):
        if repo_id not in self.repos:
            repo = Repo(repo_id, private)
            gitattributes = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
            self.blobs[git_blob_id(gitattributes)] = gitattributes
            repo.commit("main", {".gitattributes": git_blob_id(gitattributes)}, "initial commit", self.blobs)
            self.repos[repo_id] = repo
        return self.repos[repo_id]

    def _repo(self, repo_id, user, write=False):
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and user is None):
            raise HubError(404 if user else 401, f"Repository Not Found for url: {repo_id}", "RepoNotFound")
        if write and (user is None or repo_id.split("/")[0] != user):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _commit_of(self, repo, revision):
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _info(self, repo, commit):
        files = repo.commits[commit]["files"]
        card = None
        if "README.md" in files:
            try:
                card = card_metadata(self.blobs[files["README.md"]])
            except ValueError:
                card = None
        card = card or {}
        tags = list(card.get("tags") or [])
        if card.get("library_name"):
            tags.insert(0, card["library_name"])
        return {"_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
                "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0], "sha": commit,
                "private": repo.private, "gated": False, "disabled": False, "downloads": 0, "likes": 0,
                "tags": tags, "library_name": card.get("library_name"), "pipeline_tag": card.get("pipeline_tag"),
                "cardData": card or None, "createdAt": repo.created, "lastModified": repo.commits[commit]["date"],
                "siblings": [{"rfilename": p} for p in sorted(files)]}

    def handle(self, method, path, query, headers, body):
        """Route one request. Returns (status, headers, body bytes or JSON-able)."""
        auth = headers.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        user = self.USER if token else None
        with self.lock:
            self.requests.append((method, path, bool(token)))
            if token:
                self.tokens_seen.add(token)
            if self.fail_status and (self.fail_methods is None or method in self.fail_methods):
                raise HubError(self.fail_status, "Internal Error - We're working hard to fix this as soon as possible!")
        raw = path.split("/")[1:]
        seg = [unquote(s) for s in raw]

        if seg[:2] == ["api", "whoami-v2"]:
            if user is None:
                raise HubError(401, "Invalid credentials in Authorization header")
            return 200, {}, {"type": "user", "name": user, "fullname": "HVP Tester", "orgs": [],
                             "auth": {"type": "access_token", "accessToken": {"role": "write"}}}

        if seg[:2] == ["api", "validate-yaml"] and method == "POST":
            try:
                card_metadata(json.loads(body)["content"])
            except ValueError as e:
                return 400, {}, {"errors": [{"message": str(e)}], "warnings": []}
            return 200, {}, {"errors": [], "warnings": []}

        if seg[:3] == ["api", "repos", "create"] and method == "POST":
            if user is None:
                raise HubError(401, "Invalid credentials in Authorization header")
            payload = json.loads(body)
            if payload.get("type", "model") not in (None, "model"):
                raise HubError(400, "this test server only hosts model repos")
            repo_id = f"{payload.get('organization') or user}/{payload['name']}"
            url = f"{self.url}/{repo_id}"
            with self.lock:
                if repo_id in self.repos:
                    return 409, {}, {"error": "You already created this model repo", "url": url}
                private = payload.get("private") or payload.get("visibility") == "private"
                self._create(repo_id, bool(private))
            return 200, {}, {"url": url, "name": repo_id, "id": repo_id}

        if seg[:2] == ["api", "models"] and len(seg) >= 4:
            repo_id, rest, raw_rest = "/".join(seg[2:4]), seg[4:], raw[4:]
            with self.lock:
                return self._model_api(method, repo_id, rest, raw_rest, query, user, body)

        if len(seg) >= 5 and seg[2] == "resolve":
            repo_id, revision, file_path = "/".join(seg[:2]), seg[3], "/".join(seg[4:])
            with self.lock:
                repo = self._repo(repo_id, user)
                commit = self._commit_of(repo, revision)
                oid = repo.commits[commit]["files"].get(file_path)
                if oid is None:
                    raise HubError(404, f"Entry not found: {file_path}", "EntryNotFound", {"X-Repo-Commit": commit})
                content = self.blobs[oid]
            out = {"X-Repo-Commit": commit, "ETag": f'"{oid}"', "Content-Type": "application/octet-stream",
                   "Accept-Ranges": "bytes", "Content-Disposition": f'inline; filename="{file_path.split("/")[-1]}";'}
            status, rng = 200, headers.get("range", "")
            if rng.startswith("bytes="):  # resumed downloads: "bytes=<start>-[<end>]"
                start, _, end = rng[6:].partition("-")
                stop = int(end) + 1 if end else len(content)
                out["Content-Range"] = f"bytes {int(start)}-{stop - 1}/{len(content)}"
                content, status = content[int(start):stop], 206
            return status, out, content

        raise HubError(404, f"unknown endpoint {method} {path}")

    def _model_api(self, method, repo_id, rest, raw_rest, query, user, body):
        if not rest and method == "GET":
            repo = self._repo(repo_id, user)
            return 200, {}, self._info(repo, repo.branches["main"])
        if rest[:1] == ["revision"] and method == "GET":
            repo = self._repo(repo_id, user)
            return 200, {}, self._info(repo, self._commit_of(repo, unquote("/".join(raw_rest[1:]))))
        if rest == ["refs"] and method == "GET":
            repo = self._repo(repo_id, user)
            return 200, {}, {"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c}
                                          for b, c in sorted(repo.branches.items())], "tags": [], "converts": []}
        if rest[:1] == ["tree"] and len(rest) >= 2 and method == "GET":
            repo = self._repo(repo_id, user)
            files = repo.commits[self._commit_of(repo, rest[1])]["files"]
            prefix = "/".join(rest[2:]).strip("/")
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            entries, dirs = [], set()
            for p, oid in sorted(files.items()):
                if prefix and not p.startswith(prefix + "/"):
                    continue
                relative = p[len(prefix) + 1:] if prefix else p
                if "/" in relative and not recursive:
                    dirs.add((prefix + "/" if prefix else "") + relative.split("/")[0])
                    continue
                entries.append({"type": "file", "oid": oid, "size": len(self.blobs[oid]), "path": p})
            entries += [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                        for d in sorted(dirs)]
            if prefix and not entries:
                raise HubError(404, f"Entry not found: {prefix}", "EntryNotFound")
            return 200, {}, entries
        if rest[:1] == ["branch"] and method == "POST":
            repo = self._repo(repo_id, user, write=True)
            branch = unquote("/".join(raw_rest[1:]))
            if branch in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            start = (json.loads(body) if body else {}).get("startingPoint") or "main"
            repo.branches[branch] = self._commit_of(repo, start)
            return 200, {}, {}
        if rest[:1] == ["preupload"] and method == "POST":
            repo = self._repo(repo_id, user, write=True)
            commit = repo.resolve(unquote("/".join(raw_rest[1:])))
            files = repo.commits[commit]["files"] if commit else {}
            return 200, {}, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                        "oid": files.get(f["path"])} for f in json.loads(body)["files"]],
                             "commitOid": commit}
        if rest[:1] == ["commit"] and method == "POST":
            repo = self._repo(repo_id, user, write=True)
            branch = unquote("/".join(raw_rest[1:]))
            if branch not in repo.branches:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            summary, changes = "", {}
            for line in body.splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "header":
                    summary = value.get("summary", "")
                    if value.get("parentCommit") and value["parentCommit"] != repo.branches[branch]:
                        raise HubError(412, "A commit has happened since. Please refresh and try again.")
                elif key == "file":
                    content = base64.b64decode(value["content"]) if value.get("encoding") == "base64" \
                        else value["content"].encode()
                    self.blobs[git_blob_id(content)] = content
                    changes[value["path"]] = git_blob_id(content)
                elif key == "deletedFile":
                    changes[value["path"]] = None
                elif key == "deletedFolder":
                    folder = value["path"].rstrip("/") + "/"
                    for p in repo.commits[repo.branches[branch]]["files"]:
                        if p.startswith(folder):
                            changes[p] = None
                else:  # lfsFile: this server never asks for LFS uploads
                    raise HubError(400, f"unsupported commit operation {key!r} (preupload said 'regular')")
            oid = repo.commit(branch, changes, summary, self.blobs)
            return 200, {}, {"success": True, "commitOid": oid, "commitUrl": f"{self.url}/{repo_id}/commit/{oid}",
                             "pullRequestUrl": None}
        raise HubError(404, f"unknown endpoint {method} /api/models/{repo_id}/{'/'.join(rest)}")

    def _handler_class(self):
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects

            def log_message(self, *args):
                pass

            def _body(self):
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _serve(self, method):
                split = urlsplit(self.path)
                body = self._body() if method in ("POST", "PUT") else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    status, out_headers, payload = hub.handle(method, split.path, parse_qs(split.query), headers, body)
                except HubError as e:
                    status, out_headers, payload = e.status, dict(e.headers), {"error": str(e)}
                    if e.code:
                        out_headers["X-Error-Code"] = e.code
                    out_headers["X-Error-Message"] = str(e)
                except Exception as e:  # a bug in this server: show it to the client, keep serving
                    status, out_headers, payload = 500, {}, {"error": f"test server error: {e!r}"}
                if not isinstance(payload, bytes):
                    payload = json.dumps(payload).encode()
                    out_headers.setdefault("Content-Type", "application/json")
                self.send_response(status)
                for k, v in out_headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if method != "HEAD":
                    self.wfile.write(payload)

            def do_GET(self):
                self._serve("GET")

            def do_HEAD(self):
                self._serve("HEAD")

            def do_POST(self):
                self._serve("POST")

            def do_PUT(self):
                self._serve("PUT")

            def do_DELETE(self):
                self._serve("DELETE")

        return Handler
