"""A small stand-in for the Hugging Face Hub, for tests: the part of the HTTP API that the real
`huggingface_hub` client (and timm through it) uses to create a model repo, upload files, read
them back and inspect a repo. Standard library only; state lives in memory.

    server = HubServer().start()              # http://127.0.0.1:<free port>, storage on another port
    env = {"HF_ENDPOINT": server.url, "HF_HUB_DISABLE_XET": "1", ...}  # before huggingface_hub is imported
    server.fail(500)                          # every request answers 500 until server.fail(None)
    server.stop()                             # the Hub is down: connections are refused
    SilentHub().start()                       # a Hub that accepts connections and never answers

Implemented (model repos only):
    POST /api/repos/create                           create (409 + url if it exists)
    GET  /api/whoami-v2                              the user a token belongs to
    POST /api/validate-yaml                          model card metadata check
    GET  /api/models/<repo>[/revision/<rev>]         model info (sha, siblings, cardData, tags)
    GET  /api/models/<repo>/refs                     branches
    GET  /api/models/<repo>/tree/<rev>[/<path>]      file listing (LFS files with their "lfs" entry)
    POST /api/models/<repo>/branch/<branch>          create a branch
    POST /api/models/<repo>/preupload/<rev>          "lfs" for paths that .gitattributes sends to LFS
                                                     (*.safetensors) and files of 10 MiB or more, else
                                                     "regular"; no Xet
    POST /<repo>.git/info/lfs/objects/batch          Git LFS batch API, "basic" transfer: an upload
                                                     action (PUT to the storage host) and a verify action
    POST /<repo>.git/info/lfs/objects/verify         the object is stored with that size
    POST /api/models/<repo>/commit/<rev>             NDJSON commit: header, file, lfsFile, deletedFile,
                                                     deletedFolder
    HEAD/GET /<repo>/resolve/<rev>/<path>            regular file: its bytes with ETag, X-Repo-Commit,
                                                     Content-Length, Range. LFS file: 302 to the storage
                                                     host with X-Linked-Etag (the sha256), X-Linked-Size
                                                     and X-Repo-Commit, as the Hub redirects to its CDN

The storage host (`server.storage_url`, 127.0.0.1 on another port: another origin, like the Hub's
S3 and CDN) takes the LFS uploads (PUT /lfs-upload/<sha256>, only for objects a batch request
granted, and only bytes whose size and sha256 match) and serves the stored objects
(GET/HEAD /lfs-objects/<sha256>, with Range). The git tree holds LFS pointer files, as on the Hub.

What happened is recorded for the tests: `requests` and `storage_requests` ((method, path, had a
bearer token), in arrival order), `commit_log` (one dict per added file: repo, branch, path and
"regular" or "lfs", the way it came in a commit), `lfs` (sha256 -> content), `blobs` (git objects).

Errors carry the X-Error-Code header (RepoNotFound, RevisionNotFound, EntryNotFound) that
`huggingface_hub` turns into its typed exceptions. Any non-empty bearer token is accepted and belongs
to the user `HubServer.USER`; writes need one, reads of private repos too.
"""
import base64
import fnmatch
import hashlib
import http.server
import json
import re
import threading
import time
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub stores files this large through LFS whatever their name
LFS_CONTENT_TYPE = "application/vnd.git-lfs+json"
SHA256 = re.compile(r"[0-9a-f]{64}")


def git_blob_id(content):
    """The git object id of a file: what the Hub returns as ETag/oid of a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256, size):
    """The Git LFS pointer file that stands for an LFS object in the git tree."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def lfs_patterns(gitattributes):
    """The path patterns that a .gitattributes file sends to LFS (filter=lfs)."""
    text = gitattributes.decode(errors="replace") if isinstance(gitattributes, bytes) else gitattributes or ""
    return [line.split()[0] for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#") and "filter=lfs" in line.split()[1:]]


def matches_lfs(path, patterns):
    """Git's rule, simplified: a pattern without '/' matches the file name at any depth, one with '/'
    the path from the repo root."""
    name = path.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(path if "/" in pattern else name, pattern.lstrip("/")) for pattern in patterns)


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
        self.repos, self.blobs = {}, {}        # repo id -> Repo, git object id -> bytes (LFS: the pointer)
        self.lfs, self.pointers = {}, {}       # sha256 -> LFS object content, pointer object id -> sha256
        self.lfs_grants = {}                   # sha256 -> size, for uploads a batch request allowed
        self.requests = []                     # (method, path, had a bearer token), in arrival order
        self.storage_requests = []             # the same, on the storage host
        self.commit_log = []                   # {"repo", "branch", "path", "mode"} per file added by a commit
        self.tokens_seen = set()
        self.fail_status, self.fail_methods = None, None
        self.lock = threading.RLock()
        handler = self._handler_class()
        self.httpd = http.server.ThreadingHTTPServer((host, port), handler)
        self.storage_httpd = http.server.ThreadingHTTPServer((host, 0), handler)
        for server in (self.httpd, self.storage_httpd):
            server.daemon_threads = True
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        self.storage_url = f"http://{host}:{self.storage_httpd.server_address[1]}"
        self.threads = []

    # --- control, from the test -----------------------------------------------------------------

    def start(self):
        for server in (self.httpd, self.storage_httpd):
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            thread.start()
            self.threads.append((server, thread))
        return self

    def stop(self):
        for server, thread in self.threads:
            server.shutdown()
            thread.join()
        self.threads = []
        self.httpd.server_close()
        self.storage_httpd.server_close()

    def fail(self, status=500, methods=None):
        """Answer every request (or only those with a method in `methods`) with `status`; None = heal."""
        self.fail_status, self.fail_methods = status, set(methods) if methods else None

    def add_files(self, repo_id, files, branch="main", private=False, summary="seed"):
        """Put files ({path: bytes}) into a repo directly, creating it if needed, stored as a push would
        store them (LFS where preupload would say so). Returns the commit oid."""
        with self.lock:
            repo = self._create(repo_id, private)
            if branch not in repo.branches:
                repo.branches[branch] = repo.branches["main"]
            oids = {}
            for path, content in files.items():
                if self._upload_mode(repo, repo.branches[branch], path, len(content)) == "lfs":
                    sha = hashlib.sha256(content).hexdigest()
                    self.lfs[sha] = content
                    oids[path] = self._store_pointer(sha, len(content))
                else:
                    self.blobs[git_blob_id(content)] = content
                    oids[path] = git_blob_id(content)
            return repo.commit(branch, oids, summary, self.blobs)

    def file(self, repo_id, path, revision="main"):
        """Content of a file in a repo at a revision (bytes; the LFS object for an LFS file), or None."""
        with self.lock:
            repo = self.repos.get(repo_id)
            commit = repo and repo.resolve(revision)
            oid = commit and repo.commits[commit]["files"].get(path)
            if not oid:
                return None
            return self.lfs[self.pointers[oid]] if oid in self.pointers else self.blobs.get(oid)

    def stored_in_lfs(self, repo_id, path, revision="main"):
        """True if the file is an LFS pointer in the git tree (its content in LFS storage)."""
        with self.lock:
            repo = self.repos[repo_id]
            return repo.commits[repo.resolve(revision)]["files"].get(path) in self.pointers

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

    def _store_pointer(self, sha, size):
        pointer = lfs_pointer(sha, size)
        self.blobs[git_blob_id(pointer)] = pointer
        self.pointers[git_blob_id(pointer)] = sha
        return git_blob_id(pointer)

    def _upload_mode(self, repo, commit, path, size):
        """What the Hub's preupload answers: "lfs" for .gitattributes' LFS patterns and large files."""
        files = repo.commits[commit]["files"] if commit else {}
        patterns = lfs_patterns(self.blobs.get(files.get(".gitattributes"), b""))
        return "lfs" if size >= LFS_MIN_SIZE or matches_lfs(path, patterns) else "regular"

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

        if len(seg) == 6 and seg[1].endswith(".git") and seg[2:5] == ["info", "lfs", "objects"] and method == "POST":
            with self.lock:
                return self._lfs_api(seg[5], f"{seg[0]}/{seg[1][:-4]}", user, body)

        if len(seg) >= 5 and seg[2] == "resolve":
            repo_id, revision, file_path = "/".join(seg[:2]), seg[3], "/".join(seg[4:])
            name = file_path.split("/")[-1]
            with self.lock:
                repo = self._repo(repo_id, user)
                commit = self._commit_of(repo, revision)
                oid = repo.commits[commit]["files"].get(file_path)
                if oid is None:
                    raise HubError(404, f"Entry not found: {file_path}", "EntryNotFound", {"X-Repo-Commit": commit})
                if oid in self.pointers:  # as the Hub does: metadata here, the bytes from the storage host
                    sha = self.pointers[oid]
                    return 302, {"X-Repo-Commit": commit, "ETag": f'"{oid}"', "X-Linked-Etag": f'"{sha}"',
                                 "X-Linked-Size": str(len(self.lfs[sha])),
                                 "Location": f"{self.storage_url}/lfs-objects/{sha}?filename={quote(name)}"}, b""
                content = self.blobs[oid]
            return self._content(content, headers, {"X-Repo-Commit": commit, "ETag": f'"{oid}"',
                                                    "Content-Disposition": f'inline; filename="{name}";'})

        raise HubError(404, f"unknown endpoint {method} {path}")

    def handle_storage(self, method, path, query, headers, body):
        """The storage host: LFS uploads (PUT, as to a pre-signed S3 URL) and downloads (as from the CDN)."""
        with self.lock:
            self.storage_requests.append((method, path, bool(headers.get("authorization"))))
            if self.fail_status and (self.fail_methods is None or method in self.fail_methods):
                raise HubError(self.fail_status, "Internal Error")
        seg = path.split("/")[1:]
        if len(seg) == 2 and seg[0] == "lfs-upload" and method == "PUT":
            sha = seg[1]
            with self.lock:
                size = self.lfs_grants.get(sha)
            if size is None:
                raise HubError(403, f"no LFS batch request granted an upload of {sha}")
            if len(body) != size:
                raise HubError(400, f"got {len(body)} bytes for LFS object {sha}, the batch request said {size}")
            if hashlib.sha256(body).hexdigest() != sha:
                raise HubError(400, f"the sha256 of the uploaded bytes is not the oid {sha}")
            with self.lock:
                self.lfs[sha] = body
            return 200, {"ETag": f'"{hashlib.md5(body).hexdigest()}"'}, b""
        if len(seg) == 2 and seg[0] == "lfs-objects" and method in ("GET", "HEAD"):
            with self.lock:
                content = self.lfs.get(seg[1])
            if content is None:
                raise HubError(404, f"no LFS object {seg[1]}")
            name = query.get("filename", [seg[1]])[0]
            return self._content(content, headers, {"ETag": f'"{seg[1]}"',
                                                    "Content-Disposition": f'attachment; filename="{name}";'})
        raise HubError(404, f"unknown storage endpoint {method} {path}")

    @staticmethod
    def _content(content, headers, out):
        """A file's bytes, or the requested range of them (resumed downloads: "bytes=<start>-[<end>]")."""
        out = dict(out, **{"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"})
        status, rng = 200, headers.get("range", "")
        if rng.startswith("bytes="):
            start, _, end = rng[6:].partition("-")
            stop = int(end) + 1 if end else len(content)
            out["Content-Range"] = f"bytes {int(start)}-{stop - 1}/{len(content)}"
            content, status = content[int(start):stop], 206
        return status, out, content

    def _lfs_api(self, action, repo_id, user, body):
        """Git LFS batch API (https://github.com/git-lfs/git-lfs/blob/main/docs/api/batch.md), uploads with
        the "basic" transfer, and the verify call that follows an upload."""
        repo = self._repo(repo_id, user, write=True)
        request = json.loads(body)
        if action == "verify":
            sha, size = request.get("oid"), request.get("size")
            if sha not in self.lfs:
                raise HubError(404, f"LFS object {sha} was not uploaded")
            if len(self.lfs[sha]) != size:
                raise HubError(422, f"LFS object {sha} has {len(self.lfs[sha])} bytes, not {size}")
            return 200, {"Content-Type": LFS_CONTENT_TYPE}, {"message": "verified"}
        if action != "batch":
            raise HubError(404, f"unknown LFS endpoint {action}")
        if request.get("operation") != "upload":
            raise HubError(400, "this test server's LFS batch API only takes uploads")
        if "basic" not in (request.get("transfers") or ["basic"]) or request.get("hash_algo", "sha256") != "sha256":
            raise HubError(422, "this test server speaks the 'basic' transfer with sha256 oids only")
        ref = (request.get("ref") or {}).get("name")
        if ref is not None and repo.resolve(ref) is None:
            raise HubError(404, f"Invalid rev id: {ref}", "RevisionNotFound")
        objects = []
        for obj in request.get("objects", []):
            sha, size = obj.get("oid"), obj.get("size")
            if not (isinstance(sha, str) and SHA256.fullmatch(sha) and isinstance(size, int) and size >= 0):
                objects.append({"oid": str(sha), "size": size if isinstance(size, int) else -1,
                                "error": {"code": 422, "message": "an oid is 64 hex digits (sha256), a size >= 0"}})
            elif sha in self.lfs and len(self.lfs[sha]) == size:
                objects.append({"oid": sha, "size": size})  # stored already: no actions, nothing to upload
            else:
                self.lfs_grants[sha] = size
                objects.append({"oid": sha, "size": size, "authenticated": True, "actions": {
                    "upload": {"href": f"{self.storage_url}/lfs-upload/{sha}", "header": {}, "expires_in": 3600},
                    "verify": {"href": f"{self.url}/{quote(repo_id)}.git/info/lfs/objects/verify", "header": {}}}})
        return 200, {"Content-Type": LFS_CONTENT_TYPE}, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}

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
                entry = {"type": "file", "oid": oid, "size": len(self.blobs[oid]), "path": p}
                if oid in self.pointers:
                    sha = self.pointers[oid]
                    entry.update(size=len(self.lfs[sha]),
                                 lfs={"oid": sha, "size": len(self.lfs[sha]), "pointerSize": len(self.blobs[oid])})
                entries.append(entry)
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
            answers = []
            for f in json.loads(body)["files"]:
                oid = files.get(f["path"])  # what the client compares with its own to skip unchanged files:
                if oid in self.pointers:    # the sha256 for LFS files, the git object id for regular ones
                    oid = self.pointers[oid]
                answers.append({"path": f["path"], "uploadMode": self._upload_mode(repo, commit, f["path"], f["size"]),
                                "shouldIgnore": False, "oid": oid})
            return 200, {}, {"files": answers, "commitOid": commit}
        if rest[:1] in (["xet-write-token"], ["xet-read-token"]):
            raise HubError(501, "this test server has no Xet storage: run the client with HF_HUB_DISABLE_XET=1 "
                                "(it then uploads LFS files through the LFS batch API)")
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
                    if self._upload_mode(repo, repo.branches[branch], value["path"], len(content)) == "lfs":
                        raise HubError(400, f"{value['path']} must be uploaded through LFS (preupload said 'lfs'), "
                                            "not as a regular file in the commit")
                    self.blobs[git_blob_id(content)] = content
                    changes[value["path"]] = git_blob_id(content)
                    self.commit_log.append({"repo": repo_id, "branch": branch, "path": value["path"], "mode": "regular"})
                elif key == "lfsFile":
                    sha, size = value.get("oid", ""), value.get("size")
                    if value.get("algo", "sha256") != "sha256" or sha not in self.lfs:
                        raise HubError(422, f"LFS object {sha} of {value.get('path')} was never uploaded")
                    if size is not None and size != len(self.lfs[sha]):
                        raise HubError(422, f"LFS object {sha} has {len(self.lfs[sha])} bytes, the commit says {size}")
                    changes[value["path"]] = self._store_pointer(sha, len(self.lfs[sha]))
                    self.commit_log.append({"repo": repo_id, "branch": branch, "path": value["path"], "mode": "lfs"})
                elif key == "deletedFile":
                    changes[value["path"]] = None
                elif key == "deletedFolder":
                    folder = value["path"].rstrip("/") + "/"
                    for p in repo.commits[repo.branches[branch]]["files"]:
                        if p.startswith(folder):
                            changes[p] = None
                else:
                    raise HubError(400, f"unsupported commit operation {key!r}")
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
                handle = hub.handle_storage if self.server is hub.storage_httpd else hub.handle
                try:
                    status, out_headers, payload = handle(method, split.path, parse_qs(split.query), headers, body)
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


class SilentHub:
    """A "Hub" that accepts every connection on 127.0.0.1 and never answers: what a client meets
    behind a stuck proxy or an overloaded server. `connections` counts the accepted ones.

        silent = SilentHub().start()   # silent.url
        silent.stop()
    """

    def __init__(self):
        import socket
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.held, self.connections = [], 0

    def start(self):
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def _accept(self):
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:  # stopped
                return
            self.held.append(connection)  # kept open, never read from or written to
            self.connections += 1

    def stop(self):
        self.listener.close()
        for connection in self.held:
            connection.close()
