"""Start gcp-storage-emulator with the download semantics tensorstore relies on:
`python tests/gcs_emulator.py start --host=127.0.0.1 --port=PORT --in-memory --default-bucket=NAME`.

The emulator's media download sends no `x-goog-generation` header and ignores
`ifGenerationMatch` / `ifGenerationNotMatch`; tensorstore (orbax's array writer) reads
the generation of every object it caches and revalidates with those conditions, so
without them an OCDBT checkpoint fails with "Malformed StorageGeneration". Real GCS
does all three; this shim adds them, and changes nothing else.
"""

import sys
from http import HTTPStatus

from gcp_storage_emulator import server
from gcp_storage_emulator.__main__ import main
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except NotFound:
        response.status = HTTPStatus.NOT_FOUND
        return
    gen, q = str(obj["generation"]), request.query
    response["x-goog-generation"] = gen
    response["x-goog-metageneration"] = str(obj["metageneration"])
    if "ifGenerationNotMatch" in q and q["ifGenerationNotMatch"][0] == gen:
        response.status = HTTPStatus.NOT_MODIFIED
        return
    if "ifGenerationMatch" in q and q["ifGenerationMatch"][0] != gen:
        response.status = HTTPStatus.PRECONDITION_FAILED
        return
    _download(request, response, storage, *args, **kwargs)


objects.download = download  # `objects.get` with alt=media calls it by name
for _, methods in server.HANDLERS:
    for method, handler in list(methods.items()):
        if handler is _download:
            methods[method] = download

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
