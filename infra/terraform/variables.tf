variable "region" {
  description = "AWS region of the bucket; keep equal to provider.region in cluster/aws.yaml."
  type        = string
  default     = "us-west-2"
}

variable "bucket_name" {
  description = "S3 bucket for mtseg's shards, checkpoints and results (globally unique)."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.bucket_name))
    error_message = "bucket_name must be 3-63 lowercase letters, digits, dots or hyphens, starting and ending with a letter or digit."
  }
}

variable "name" {
  description = "Prefix of the IAM names. cluster/aws.yaml uses the instance profiles <name>-ray-head and <name>-ray-worker."
  type        = string
  default     = "mtseg"
}

variable "force_destroy" {
  description = "Let `terraform destroy` delete a bucket that still holds objects (checkpoints, shards)."
  type        = bool
  default     = false
}

variable "incomplete_upload_days" {
  description = "Abort multipart uploads left incomplete (an interrupted shard or checkpoint upload) after this many days."
  type        = number
  default     = 3
}

variable "eks_oidc_provider_arn" {
  description = "Optional: ARN of an EKS cluster's IAM OIDC provider, to let Kubernetes pods assume the worker role (IRSA) instead of using a credentials Secret."
  type        = string
  default     = ""
}

variable "eks_service_account" {
  description = "The namespace:name of the Kubernetes service account allowed to assume the worker role through IRSA."
  type        = string
  default     = "default:mtseg"
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = { project = "mtseg" }
}
