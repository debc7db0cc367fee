"""The tutorial's data/coco layout: where InternVL's COCO Caption files live, by name (used by every data reader)."""

ANNOTATIONS = "annotations"
TUTORIAL_JSONL = "coco_karpathy_train_567k.jsonl"  # one conversation per training caption
TUTORIAL_TEST = "coco_karpathy_test.json"  # the 5,000 test images, LAVIS format
TUTORIAL_TEST_GT = "coco_karpathy_test_gt.json"  # their references, COCO captions format
TUTORIAL_META = "coco_caption.json"  # InternVL's meta file naming the training jsonl
