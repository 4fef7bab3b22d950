# What mtseg needs beside Ray on AWS: one S3 bucket (shards, checkpoints, results) and IAM that
# reaches that bucket and nothing else.
#
#   terraform -chdir=infra/terraform init
#   terraform -chdir=infra/terraform apply -var bucket_name=my-mtseg-bucket
#
# cluster/aws.yaml launches its nodes with the two instance profiles made here: the workers'
# (bucket only) and the head's (bucket plus the EC2 calls of Ray's autoscaler).

terraform {
  required_version = ">= 1.5"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.0, < 7.0"
    }
  }
}

provider "aws" {
  region = var.region

  default_tags {
    tags = var.tags
  }
}

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}

# ---------------------------------------------------------------------------- bucket

resource "aws_s3_bucket" "data" {
  bucket        = var.bucket_name
  force_destroy = var.force_destroy
}

# Private: no ACLs, no public access, objects owned by the account.
resource "aws_s3_bucket_ownership_controls" "data" {
  bucket = aws_s3_bucket.data.id

  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "data" {
  bucket                  = aws_s3_bucket.data.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_server_side_encryption_configuration" "data" {
  bucket = aws_s3_bucket.data.id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

# mtseg writes small objects with single PUTs, but Ray Train uploads large checkpoints in
# parts; an interrupted upload leaves billed parts behind until this rule removes them.
resource "aws_s3_bucket_lifecycle_configuration" "data" {
  bucket = aws_s3_bucket.data.id

  rule {
    id     = "abort-incomplete-multipart-uploads"
    status = "Enabled"

    filter {}

    abort_incomplete_multipart_upload {
      days_after_initiation = var.incomplete_upload_days
    }
  }
}

# Refuse plain-HTTP requests to the bucket.
data "aws_iam_policy_document" "bucket_tls_only" {
  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.data.arn, "${aws_s3_bucket.data.arn}/*"]

    principals {
      type        = "*"
      identifiers = ["*"]
    }

    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "data" {
  bucket = aws_s3_bucket.data.id
  policy = data.aws_iam_policy_document.bucket_tls_only.json

  depends_on = [aws_s3_bucket_public_access_block.data]
}

# ---------------------------------------------------------------------------- bucket access

# Read, write and delete objects in this bucket (shards, checkpoints, pruning old checkpoints),
# list it, and nothing else in S3.
data "aws_iam_policy_document" "bucket_access" {
  statement {
    sid       = "ListTheBucket"
    actions   = ["s3:ListBucket", "s3:GetBucketLocation", "s3:ListBucketMultipartUploads"]
    resources = [aws_s3_bucket.data.arn]
  }

  statement {
    sid = "ObjectsInTheBucket"
    actions = [
      "s3:GetObject",
      "s3:PutObject",
      "s3:DeleteObject",
      "s3:AbortMultipartUpload",
      "s3:ListMultipartUploadParts",
    ]
    resources = ["${aws_s3_bucket.data.arn}/*"]
  }
}

resource "aws_iam_policy" "bucket_access" {
  name        = "${var.name}-bucket-access"
  description = "Read/write access to s3://${var.bucket_name} only."
  policy      = data.aws_iam_policy_document.bucket_access.json
}

# ---------------------------------------------------------------------------- worker role

data "aws_iam_policy_document" "worker_assume" {
  statement {
    sid     = "Ec2Nodes"
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }

  # Kubernetes pods of one service account (KubeRay on EKS), when an OIDC provider is given.
  dynamic "statement" {
    for_each = var.eks_oidc_provider_arn == "" ? [] : [var.eks_oidc_provider_arn]

    content {
      sid     = "EksServiceAccount"
      actions = ["sts:AssumeRoleWithWebIdentity"]

      principals {
        type        = "Federated"
        identifiers = [statement.value]
      }

      condition {
        test     = "StringEquals"
        variable = "${replace(statement.value, "/^arn:[^:]+:iam::[0-9]+:oidc-provider\\//", "")}:sub"
        values   = ["system:serviceaccount:${var.eks_service_account}"]
      }
    }
  }
}

resource "aws_iam_role" "worker" {
  name               = "${var.name}-ray-worker"
  description        = "Ray worker nodes of mtseg: the bucket, nothing else."
  assume_role_policy = data.aws_iam_policy_document.worker_assume.json
}

resource "aws_iam_role_policy_attachment" "worker_bucket" {
  role       = aws_iam_role.worker.name
  policy_arn = aws_iam_policy.bucket_access.arn
}

resource "aws_iam_instance_profile" "worker" {
  name = "${var.name}-ray-worker"
  role = aws_iam_role.worker.name
}

# ---------------------------------------------------------------------------- head role

data "aws_iam_policy_document" "ec2_assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

# What Ray's autoscaler on the head calls to launch, tag and remove worker nodes, and to hand
# them the worker instance profile (and only that one).
data "aws_iam_policy_document" "autoscaler" {
  statement {
    sid = "ManageInstances"
    actions = [
      "ec2:RunInstances",
      "ec2:TerminateInstances",
      "ec2:StartInstances",
      "ec2:StopInstances",
      "ec2:CreateTags",
      "ec2:Describe*",
    ]
    resources = ["*"]
  }

  statement {
    sid       = "PassTheWorkerRole"
    actions   = ["iam:PassRole", "iam:GetInstanceProfile"]
    resources = [aws_iam_role.worker.arn, aws_iam_instance_profile.worker.arn]
  }

  # cluster/aws.yaml names its AMI by a public SSM parameter (resolve:ssm:...), which EC2
  # resolves with the caller's rights.
  statement {
    sid       = "ResolveDeepLearningAmi"
    actions   = ["ssm:GetParameters", "ssm:GetParameter"]
    resources = ["arn:${data.aws_partition.current.partition}:ssm:${var.region}::parameter/aws/service/deeplearning/*"]
  }
}

resource "aws_iam_policy" "autoscaler" {
  name        = "${var.name}-ray-autoscaler"
  description = "EC2 rights of the Ray autoscaler on the mtseg head node."
  policy      = data.aws_iam_policy_document.autoscaler.json
}

resource "aws_iam_role" "head" {
  name               = "${var.name}-ray-head"
  description        = "Ray head node of mtseg: the bucket and the autoscaler's EC2 calls."
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
}

resource "aws_iam_role_policy_attachment" "head_bucket" {
  role       = aws_iam_role.head.name
  policy_arn = aws_iam_policy.bucket_access.arn
}

resource "aws_iam_role_policy_attachment" "head_autoscaler" {
  role       = aws_iam_role.head.name
  policy_arn = aws_iam_policy.autoscaler.arn
}

resource "aws_iam_instance_profile" "head" {
  name = "${var.name}-ray-head"
  role = aws_iam_role.head.name
}
