// Command istio-agent-client requests, writes and rotates a workload certificate with Istio's own
// agent code, the way pilot-agent does with DISABLE_ENVOY=true (pkg/istio-agent/agent.go
// initSdsServer and getWorkloadCerts): citadel.NewCitadelClient for the CA connection,
// cache.NewSecretManagerClient for key generation, CSR, rotation timing and OUTPUT_CERTS files.
//
// Each flag is named after the istio-agent environment variable it stands for, and defaults to that
// variable when it is set. Every issuance and every failed attempt is one JSON line on stdout, so a
// test can follow what happened; Istio's own logs go to stderr.
//
// `istio-agent-client xds ...` is a second mode (xds.go): a downstream ADS client on pilot-agent's local
// XDS socket, standing in for Envoy.
package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"istio.io/istio/pkg/backoff"
	"istio.io/istio/pkg/security"
	"istio.io/istio/security/pkg/credentialfetcher/plugin"
	"istio.io/istio/security/pkg/nodeagent/cache"
	"istio.io/istio/security/pkg/nodeagent/caclient/providers/citadel"
)

// headers collects repeated -ca-header NAME=VALUE flags (CA_HEADER_<NAME>=VALUE in istio-agent).
type headers map[string]string

func (h headers) String() string { return fmt.Sprint(map[string]string(h)) }

func (h headers) Set(v string) error {
	name, value, ok := strings.Cut(v, "=")
	if !ok || name == "" {
		return fmt.Errorf("want NAME=VALUE, got %q", v)
	}
	h[name] = value
	return nil
}

func envOr(name, fallback string) string {
	if v, ok := os.LookupEnv(name); ok {
		return v
	}
	return fallback
}

func envDuration(name string, fallback time.Duration) time.Duration {
	if v, ok := os.LookupEnv(name); ok {
		if d, err := time.ParseDuration(v); err == nil {
			return d
		}
	}
	return fallback
}

func envInt(name string, fallback int) int {
	if v, ok := os.LookupEnv(name); ok {
		if n, err := strconv.Atoi(v); err == nil {
			return n
		}
	}
	return fallback
}

// event is one machine-readable line on stdout.
type event struct {
	Event     string   `json:"event"`
	Resource  string   `json:"resource,omitempty"`
	Issuance  int      `json:"issuance,omitempty"`
	Serial    string   `json:"serial,omitempty"`
	NotBefore string   `json:"not_before,omitempty"`
	NotAfter  string   `json:"not_after,omitempty"`
	ChainLen  int      `json:"chain_len,omitempty"`
	URIs      []string `json:"uri_sans,omitempty"`
	Key       string   `json:"key,omitempty"`
	Error     string   `json:"error,omitempty"`
}

var stdout = struct {
	sync.Mutex
	enc *json.Encoder
}{enc: json.NewEncoder(os.Stdout)}

func emit(e event) {
	stdout.Lock()
	defer stdout.Unlock()
	_ = stdout.enc.Encode(e)
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "xds" {
		runXDS(os.Args[2:])
		return
	}
	caHeaders := headers{}
	for _, kv := range os.Environ() {
		if name, value, ok := strings.Cut(kv, "="); ok && strings.HasPrefix(name, "CA_HEADER_") {
			caHeaders[strings.TrimPrefix(name, "CA_HEADER_")] = value
		}
	}
	caAddr := flag.String("ca-addr", envOr("CA_ADDR", "localhost:15012"),
		"CA_ADDR: the CA's host:port (a host containing 'localhost' means TLS ServerName istiod.istio-system.svc)")
	caSAN := flag.String("istiod-san", envOr("ISTIOD_SAN", ""), "ISTIOD_SAN: override the TLS ServerName of the CA")
	caRoot := flag.String("ca-root-ca", envOr("CA_ROOT_CA", "var/run/secrets/istio/root-cert.pem"),
		"CA_ROOT_CA: root certificate(s) for the CA connection ('' = system roots)")
	token := flag.String("token", envOr("ISTIO_TOKEN", "var/run/secrets/tokens/istio-token"),
		"the projected service-account token file, re-read on every request ('' = send no token)")
	provCert := flag.String("prov-cert", envOr("PROV_CERT", ""),
		"PROV_CERT: folder with key.pem and cert-chain.pem presented as TLS client certificate (mTLS renewal)")
	clusterID := flag.String("cluster-id", envOr("ISTIO_META_CLUSTER_ID", "Kubernetes"), "ISTIO_META_CLUSTER_ID: sent as ClusterID metadata")
	certSigner := flag.String("cert-signer", envOr("ISTIO_META_CERT_SIGNER", ""), "ISTIO_META_CERT_SIGNER: CertSigner request metadata")
	flag.Var(caHeaders, "ca-header", "CA_HEADER_<NAME>=VALUE as NAME=VALUE: an extra request header (repeatable)")
	trustDomain := flag.String("trust-domain", envOr("TRUST_DOMAIN", "cluster.local"), "TRUST_DOMAIN")
	namespace := flag.String("pod-namespace", envOr("POD_NAMESPACE", "default"), "POD_NAMESPACE")
	serviceAccount := flag.String("service-account", envOr("SERVICE_ACCOUNT", "default"), "SERVICE_ACCOUNT")
	sigAlg := flag.String("ecc-signature-algorithm", envOr("ECC_SIGNATURE_ALGORITHM", ""),
		"ECC_SIGNATURE_ALGORITHM: ECDSA for an EC key, else RSA")
	curve := flag.String("ecc-curve", envOr("ECC_CURVE", "P256"), "ECC_CURVE")
	rsaBits := flag.Int("workload-rsa-key-size", envInt("WORKLOAD_RSA_KEY_SIZE", 2048), "WORKLOAD_RSA_KEY_SIZE")
	ttl := flag.Duration("secret-ttl", envDuration("SECRET_TTL", 24*time.Hour), "SECRET_TTL: requested certificate lifetime")
	grace := flag.Float64("secret-grace-period-ratio", 0.5, "SECRET_GRACE_PERIOD_RATIO: rotate when this share of the lifetime is left")
	out := flag.String("output-certs", envOr("OUTPUT_CERTS", ""), "OUTPUT_CERTS: folder for key.pem, cert-chain.pem, root-cert.pem")
	once := flag.Bool("once", false, "exit after the first issuance (same as -rotations 0)")
	rotations := flag.Int("rotations", -1, "exit after this many rotations following the first issuance (-1 = run until signalled)")
	attempts := flag.Int("fetch-attempts", 0, "give up after this many failed fetches in a row (0 = retry forever, as the agent does)")
	timeout := flag.Duration("timeout", 0, "fail (exit 1) if not done within this time (0 = no limit)")
	flag.Parse()
	if *once {
		*rotations = 0
	}

	// The options pilot/cmd/pilot-agent/options/security.go NewSecurityOptions builds from the same variables.
	opts := &security.Options{
		CAEndpoint:                           *caAddr,
		CAEndpointSAN:                        *caSAN,
		CAProviderName:                       "Citadel",
		TrustDomain:                          *trustDomain,
		WorkloadNamespace:                    *namespace,
		ServiceAccount:                       *serviceAccount,
		ClusterID:                            *clusterID,
		CertSigner:                           *certSigner,
		CAHeaders:                            caHeaders,
		WorkloadRSAKeySize:                   *rsaBits,
		ECCSigAlg:                            *sigAlg,
		ECCCurve:                             *curve,
		SecretTTL:                            *ttl,
		SecretRotationGracePeriodRatio:       *grace,
		SecretRotationGracePeriodRatioJitter: 0.01,
		OutputKeyCertToDir:                   *out,
		ProvCert:                             *provCert,
	}
	// OutputKeyCertToDir does not create the folder (in a pod it is a mounted emptyDir).
	if *out != "" {
		if err := os.MkdirAll(*out, 0o700); err != nil {
			emit(event{Event: "error", Error: err.Error()})
			os.Exit(1)
		}
	}
	if *token != "" {
		opts.CredFetcher = plugin.CreateTokenPlugin(*token)
	}
	// pkg/istio-agent/plugins.go createCitadel: the client certificate comes only from PROV_CERT.
	tlsOpts := &citadel.TLSOptions{RootCert: *caRoot}
	if *provCert != "" {
		tlsOpts.Key = *provCert + "/key.pem"
		tlsOpts.Cert = *provCert + "/cert-chain.pem"
	}

	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	if *timeout > 0 {
		ctx, cancel = context.WithTimeout(ctx, *timeout)
		defer cancel()
	}

	client, err := citadel.NewCitadelClient(opts, tlsOpts)
	if err != nil {
		emit(event{Event: "error", Error: err.Error()})
		os.Exit(1)
	}
	sm, err := cache.NewSecretManagerClient(client, opts)
	if err != nil {
		emit(event{Event: "error", Error: err.Error()})
		os.Exit(1)
	}
	defer sm.Close() // closes the CA client too

	var (
		mu       sync.Mutex
		issued   int
		done     = make(chan struct{})
		doneOnce sync.Once
		failed   = make(chan struct{})
		failOnce sync.Once
	)
	// getWorkloadCerts in the agent (pkg/istio-agent/agent.go, DISABLE_ENVOY): "default" then "ROOTCA",
	// retried forever with Istio's backoff.NewExponentialBackOff(backoff.DefaultOption()) (500 ms growing
	// 1.5x with jitter to 60 s); GenerateSecret writes the files. Each attempt is one CSRSign, which itself
	// retries retryable codes (security.CARetryInterceptor) and rebuilds its connection after a failure.
	fetch := func() {
		b := backoff.NewExponentialBackOff(backoff.DefaultOption())
		for failures := 0; ; {
			item, err := sm.GenerateSecret(security.WorkloadKeyCertResourceName)
			if err == nil {
				_, err = sm.GenerateSecret(security.RootCertReqResourceName)
			}
			if err == nil {
				mu.Lock()
				issued++
				n := issued
				mu.Unlock()
				emit(describe(item, n))
				if *rotations >= 0 && n > *rotations {
					doneOnce.Do(func() { close(done) })
				}
				return
			}
			emit(event{Event: "error", Resource: security.WorkloadKeyCertResourceName, Error: err.Error()})
			failures++
			if *attempts > 0 && failures >= *attempts {
				failOnce.Do(func() { close(failed) })
				return
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(b.NextBackOff()):
			}
		}
	}
	// The rotation handler: the secret manager empties its cache at the rotation time and calls this.
	sm.RegisterSecretHandler(func(resource string) {
		if resource == security.WorkloadKeyCertResourceName {
			fetch()
		}
	})
	go fetch()

	select {
	case <-done:
	case <-failed:
		os.Exit(1)
	case <-ctx.Done():
		if ctx.Err() == context.DeadlineExceeded {
			emit(event{Event: "timeout", Error: fmt.Sprintf("not done within %v", *timeout)})
			os.Exit(1)
		}
		// A signal: stop as the agent does.
	}
}

// describe turns an issued secret into its event line.
func describe(item *security.SecretItem, n int) event {
	e := event{Event: "issued", Resource: item.ResourceName, Issuance: n}
	rest := item.CertificateChain
	for {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		e.ChainLen++
		if e.ChainLen > 1 {
			continue
		}
		leaf, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			e.Error = err.Error()
			continue
		}
		e.Serial = leaf.SerialNumber.Text(16)
		e.NotBefore = leaf.NotBefore.UTC().Format(time.RFC3339)
		e.NotAfter = leaf.NotAfter.UTC().Format(time.RFC3339)
		for _, u := range leaf.URIs {
			e.URIs = append(e.URIs, u.String())
		}
		switch k := leaf.PublicKey.(type) {
		case *rsa.PublicKey:
			e.Key = fmt.Sprintf("RSA-%d", k.N.BitLen())
		case *ecdsa.PublicKey:
			e.Key = "ECDSA-" + k.Curve.Params().Name
		}
	}
	return e
}
