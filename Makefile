.PHONY: quickstart down test unit crd
quickstart:  ## set up everything and run the main job
	bash deploy/local/quickstart.sh
down:        ## tear down what quickstart started (the model, the Helm release, the dev cluster)
	.venv/bin/python -m plansmith.devcluster.quickstart down
test:        ## set up everything and run the whole test suite
	bash deploy/local/test.sh
unit:        ## unit tests only (no control plane, no S3)
	bash deploy/local/test.sh -m "not controlplane and not s3"
crd:         ## regenerate crds/inferencemodel.yaml from the Python model (and its copies in the chart and kustomize base)
	.venv/bin/python -m plansmith.crd > crds/inferencemodel.yaml
	cp crds/inferencemodel.yaml charts/plansmith/crds/inferencemodel.yaml
	.venv/bin/python deploy/kustomize/generate.py
