output "bucket" {
  description = "The bucket's name."
  value       = aws_s3_bucket.data.bucket
}

output "data_uri" {
  description = "Where to shard COCO (data.uri)."
  value       = "s3://${aws_s3_bucket.data.bucket}/coco/shards"
}

output "storage_path" {
  description = "Where runs keep checkpoints and results (train.storage_path)."
  value       = "s3://${aws_s3_bucket.data.bucket}/runs"
}

output "bucket_access_policy_arn" {
  description = "The policy scoped to the bucket, to attach to any other role (e.g. an EKS node role)."
  value       = aws_iam_policy.bucket_access.arn
}

output "worker_role_arn" {
  description = "Role of the worker nodes; with eks_oidc_provider_arn set, annotate the Kubernetes service account with it (eks.amazonaws.com/role-arn)."
  value       = aws_iam_role.worker.arn
}

output "head_instance_profile" {
  description = "Instance profile of the head node (cluster/aws.yaml, head)."
  value       = aws_iam_instance_profile.head.name
}

output "worker_instance_profile" {
  description = "Instance profile of the worker nodes (cluster/aws.yaml, gpu_worker and cpu_worker)."
  value       = aws_iam_instance_profile.worker.name
}

output "account_id" {
  description = "The AWS account the resources are in."
  value       = data.aws_caller_identity.current.account_id
}
